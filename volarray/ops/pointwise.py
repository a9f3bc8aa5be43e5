"""Per-voxel ops: an output voxel depends only on the same voxel of the inputs.

Activations, arithmetic, eval-mode norms, casts and copies need no halo: the tile op
calls the captured node's own target on the tile (`Pointwise`). ``monotone`` marks ops
increasing in each channel's score alike (sigmoid, softmax over channels, copies): the
argmax over channels is unchanged by them, so an argmax head may skip them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LocalOp, resolve
from .calls import node_call
from .fill import INSIDE


@dataclass
class Pointwise(LocalOp):
    """Any op whose output voxel depends only on the same voxel of its inputs
    (activations, eval norms, add/mul, cat and softmax over channels)."""

    call: Callable | None = None  # called as call(ctx, *args, **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    monotone: bool = False  # increasing per channel (sigmoid, softmax over channels, ...)
    is_relu: bool = False  # a plain ReLU of its one input (a conv before it may run it)

    def __post_init__(self):
        self.fills = (INSIDE,) * self.n_inputs

    def need(self, axis, out):
        return (out,) * self.n_inputs

    def run(self, ctx, inputs, out):
        args, kwargs = resolve((self.args, self.kwargs), ctx, inputs)
        return self.call(ctx, *args, **kwargs)


def pointwise(ctx, macs: float = 1.0, monotone: bool = False) -> Pointwise:
    """The node itself, run per tile; ``macs`` per output channel."""
    args, kwargs = ctx.template()
    return Pointwise(n_inputs=len(ctx.spatial), call=node_call(ctx.node), args=args,
                     kwargs=kwargs, macs=macs * ctx.c_out, monotone=monotone)


# ---------------------------------------------------------------- builders
# Cost per byte of output against a ReLU's (`benchmarks/results/op_rates.md`): SiLU and
# sigmoid 1.8-2.0, GELU 2.4-2.5; add, norms and copies 1.1-1.3 stay at 1
TRANSCENDENTAL = frozenset({
    "silu", "sigmoid", "tanh", "gelu", "mish", "elu", "selu", "celu", "softplus",
    "logsigmoid", "log_sigmoid", "tanhshrink", "exp", "expm1", "log", "log1p", "erf", "sin",
    "cos", "swish"})
TRANSCENDENTAL_PASSES = 1.9


def op_name(target) -> str:
    """A call target's plain name: a module class's (``SiLU`` -> ``silu``), a function's,
    a method's, or an aten overload's (``aten.silu.default`` -> ``silu``), without an
    in-place variant's trailing underscore."""
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    name = name.lower()
    if name.startswith("aten."):
        name = name[len("aten."):]
    return name.split(".")[0].rstrip("_")


def transcendental(ctx) -> bool:
    """Whether the node computes a transcendental function per voxel (by exact name:
    LeakyReLU, Hardtanh and Hardsigmoid are not)."""
    module = getattr(ctx, "module", None)
    return op_name(type(module) if module is not None else ctx.node.target) in TRANSCENDENTAL


def elementwise(ctx) -> Pointwise:
    """Activations and arithmetic."""
    op = pointwise(ctx)
    if transcendental(ctx):
        op.memory_passes = TRANSCENDENTAL_PASSES
    return op


def relu(ctx) -> Pointwise:
    """ReLU, which a convolution right before it may run in its own kernel."""
    op = pointwise(ctx)
    op.is_relu = (len(ctx.spatial) == 1  # nothing but ``inplace`` beside the input
                  and all(isinstance(v, bool) for v in op.args[1:])
                  and set(op.kwargs) <= {"inplace"})
    return op


def increasing(ctx) -> Pointwise:
    """Sigmoid, tanh and copies: strictly increasing, the argmax is kept."""
    op = pointwise(ctx, monotone=True)
    if transcendental(ctx):
        op.memory_passes = TRANSCENDENTAL_PASSES
    return op


def identity(ctx) -> Pointwise:
    """Copies (clone, contiguous, detach, ...): no work, the argmax is kept."""
    return pointwise(ctx, macs=0, monotone=True)


def cast(ctx) -> Pointwise:
    """A dtype cast: no work; ties may appear, so not monotone."""
    return pointwise(ctx, macs=0)


def is_aten_pointwise(fn) -> bool:
    """An ATen op that PyTorch tags pointwise (what export leaves unlowered)."""
    return isinstance(fn, torch._ops.OpOverload) and torch.Tag.pointwise in fn.tags


aten = torch.ops.aten
RELU_MODULES = (nn.ReLU,)
RELU_FUNCTIONS = (torch.relu, F.relu, aten.relu.default, aten.relu_.default)
RELU_METHODS = ("relu", "relu_")
ACTIVATION_MODULES = (
    nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)
INCREASING_MODULES = (nn.Sigmoid, nn.Tanh, nn.Identity)
FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.neg, torch.exp, torch.log, torch.abs, torch.sqrt,
    torch.rsqrt, torch.square, torch.pow, torch.clamp, torch.clip, torch.maximum, torch.minimum,
    torch.where, torch.sin, torch.cos, torch.erf, torch.log1p, torch.expm1, torch.reciprocal,
    F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid,
    F.threshold,
)
INCREASING_FUNCTIONS = (torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                        aten.sigmoid.default, aten.tanh.default)
METHODS = (
    "add", "sub", "mul", "div", "neg", "exp", "log", "abs", "sqrt",
    "pow", "clamp", "clip", "square", "__add__", "__mul__",
    "__sub__", "__truediv__", "__radd__", "__rmul__", "add_", "mul_",
)
INCREASING_METHODS = ("sigmoid", "tanh", "contiguous", "clone", "float", "sigmoid_")
# ATen ops that pass values through: copies, and dtype casts
ATEN_COPIES = (aten.clone.default, aten.contiguous.default, aten.alias.default,
               aten.detach.default, aten.lift_fresh_copy.default)
ATEN_CASTS = (aten.to.dtype, aten._to_copy.default)
