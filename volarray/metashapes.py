"""Whole-volume shapes of concatenation, pointwise ops, reductions and upsampling,
without their meta kernels.

On meta tensors, most of torch's pointwise ops and its interpolation run Python
references (``torch._refs``, ``torch._decomp``) wrapped to keep torch.compile out, and
the first such call imports torch._dynamo: 1.3 s, the largest part of tracing torchseis's
FaultSSL (its first residual add). `volarray.trace.meta_shapes` asks these functions
first; each returns an empty meta tensor of the op's shape and dtype, or None for any
form it does not know (torch's own op then decides, and says what is wrong).
"""
from __future__ import annotations

import functools
import math
import numbers
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.pointwise import (ACTIVATION_MODULES, FUNCTIONS, INCREASING_FUNCTIONS,
                            INCREASING_MODULES, METHODS, RELU_FUNCTIONS, RELU_METHODS,
                            RELU_MODULES)

# values out of floating-point inputs keep their promoted dtype (casts are not here)
POINTWISE_FUNCTIONS = frozenset(f for f in FUNCTIONS + RELU_FUNCTIONS + INCREASING_FUNCTIONS
                                if not isinstance(f, torch._ops.OpOverload))
# in-place methods (``add_``) keep their first operand's dtype: torch decides those
POINTWISE_METHODS = frozenset(m for m in METHODS + RELU_METHODS + ("sigmoid", "tanh")
                              if not m.endswith("_") or m.startswith("__"))
POINTWISE_MODULES = RELU_MODULES + ACTIVATION_MODULES + INCREASING_MODULES
# Norms return their input's shape and dtype; on meta tensors their kernels run torch's
# Python decompositions (1.6 ms an InstanceNorm3d call: 1.5-2.4 s of FaultSSL's 900)
SHAPE_KEEPING_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm,
                       nn.GroupNorm, nn.LayerNorm)


def pointwise(args, kwargs) -> torch.Tensor | None:
    """An op over ``args`` and ``kwargs`` whose tensors are floating-point meta tensors
    of one or more dimensions (a 0-d tensor promotes as a number does) and whose other
    values are Python numbers, flags or None: the tensors' broadcast shape, and their
    promoted dtype."""
    if "out" in kwargs:  # torch resizes and casts to ``out``
        return None
    values = list(args) + list(kwargs.values())
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or not all(t.is_meta and t.is_floating_point() and t.dim() > 0
                              for t in tensors):
        return None
    if not all(isinstance(v, (torch.Tensor, bool, int, float, type(None))) for v in values):
        return None
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    except RuntimeError:
        return None
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    first = tensors[0]
    if first.shape == shape and first.dtype == dtype:
        return torch.empty_like(first)  # its memory format, as the op's output has
    return torch.empty(shape, dtype=dtype, device="meta")


def upsampled(x, size=None, scale_factor=None):
    """``F.interpolate``'s output for a floating-point meta ``x``: ``size``, or each side
    times ``scale_factor`` rounded down (as torch computes it)."""
    if not (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()
            and x.dim() >= 3) or (size is None) == (scale_factor is None):
        return None
    n = x.dim() - 2
    try:  # a numpy scalar or anything else torch takes and this does not: torch decides
        if size is not None:
            sides = (size,) * n if isinstance(size, numbers.Integral) else tuple(size)
            sides = tuple(operator.index(s) for s in sides)
        else:
            scales = (scale_factor,) * n if isinstance(scale_factor, numbers.Real) \
                else tuple(scale_factor)
            if not all(isinstance(s, numbers.Real) for s in scales):
                return None
            sides = tuple(math.floor(float(d) * float(s)) for d, s in zip(x.shape[2:], scales))
    except TypeError:
        return None
    if len(sides) != n or not all(s > 0 for s in sides):
        return None
    return torch.empty(tuple(x.shape[:2]) + sides, dtype=x.dtype, device="meta")


REDUCTIONS = ("mean", "sum", "amax", "amin")  # as methods and torch's functions
REDUCTION_FUNCTIONS = frozenset(getattr(torch, r) for r in REDUCTIONS)


def reduced(x, dim=None, keepdim=False):
    """``x.mean(dim, keepdim)`` (or sum, amax, amin) of a floating-point meta ``x``:
    ``dim`` (an int or a sequence of them; None: all) dropped, or kept as 1."""
    if not (isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()) or \
            not isinstance(keepdim, bool):
        return None
    dims = range(x.dim()) if dim is None else (dim,) if isinstance(dim, int) else dim
    if not dims or not all(isinstance(d, int) and -x.dim() <= d < x.dim() for d in dims):
        return None  # an empty ``dim`` reduces every dim in torch
    gone = {d % x.dim() for d in dims}
    shape = [1 if i in gone else s for i, s in enumerate(x.shape) if keepdim or i not in gone]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def reduction(args, kwargs) -> torch.Tensor | None:
    if not set(kwargs) <= {"dim", "keepdim"} or len(args) > 3:
        return None
    return reduced(**dict(zip(("x", "dim", "keepdim"), args), **kwargs))


def meta_cat(tensors, dim=0):
    """``torch.cat(tensors, dim)`` of meta tensors of one dtype and rank, as an empty
    meta tensor; None for anything else (torch's own cat decides, and says what is
    wrong)."""
    if (not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int)
            or not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)):
        return None
    first = tensors[0]
    rank, dim = first.dim(), dim % max(first.dim(), 1)
    same = all(t.dim() == rank and t.dtype == first.dtype and all(
        a == b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim)
        for t in tensors)
    if not same or rank == 0:
        return None
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def shaped_call(target, args, kwargs) -> torch.Tensor | None:
    if target is torch.cat:  # its meta kernel imports torch._dynamo too
        return meta_cat(*args, **kwargs)
    if target in POINTWISE_FUNCTIONS:
        return pointwise(args, kwargs)
    if target in REDUCTION_FUNCTIONS:
        return reduction(args, kwargs)
    if target is F.interpolate and len(args) <= 3:
        known = {"size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                 "antialias"}
        if set(kwargs) <= known:
            given = dict(zip(("input", "size", "scale_factor"), args), **kwargs)
            return upsampled(given.get("input"), given.get("size"),
                             given.get("scale_factor"))
    return None


def shaped_method(name, args, kwargs) -> torch.Tensor | None:
    if name in REDUCTIONS:
        return reduction(args, kwargs)
    return pointwise(args, kwargs) if name in POINTWISE_METHODS else None


def shaped_module(module: nn.Module, args, kwargs) -> torch.Tensor | None:
    """A norm or a parameterless activation of one input, an ``nn.Upsample``, or an
    ``nn.Linear`` (a squeeze-excitation's MLP: its meta kernel is addmm's reference)."""
    if len(args) != 1 or kwargs or "forward" in vars(module):  # a forward of its own
        return None
    x, cls = args[0], type(module)
    if isinstance(module, SHAPE_KEEPING_NORMS):  # as before: their subclasses too
        return torch.empty_like(x)
    if cls in POINTWISE_MODULES:  # exactly these classes: a subclass may do more
        return pointwise(args, {})
    if cls is nn.Upsample:
        return upsampled(x, module.size, module.scale_factor)
    if cls is nn.Linear and isinstance(x, torch.Tensor) and x.is_meta and x.dim() >= 1:
        w, b = module.weight, module.bias  # its weights, not its attributes, say
        if w.dim() == 2 and x.shape[-1] == w.shape[1] and x.dtype == w.dtype and (
                b is None or tuple(b.shape) == (w.shape[0],)):
            return torch.empty(tuple(x.shape[:-1]) + (w.shape[0],), dtype=x.dtype,
                               device="meta")
    return None
