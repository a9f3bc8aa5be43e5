"""A captured node as a callable a worker can run: ``call(ctx, *args, **kwargs)``.

Per-voxel tile ops and whole-volume evaluations call the node's own target on resolved
arguments. Ops never write into their inputs here: a tile's input may be a view of rows
that a swept task keeps for its next slab (the whole-volume forward ran its readers
first).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

aten = torch.ops.aten


class AtenCall:
    """An ATen op as a picklable callable (OpOverload objects do not pickle), for tile
    ops that run on workers in other processes."""

    def __init__(self, op):
        self.name, self.overload = op._schema.name.split("::")[1], op._overloadname

    @property
    def op(self):
        return getattr(getattr(aten, self.name), self.overload)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)

    def __repr__(self):
        return f"aten.{self.name}.{self.overload}"


class CallModule:
    """Call the traced model's submodule ``target`` (a class, not a closure: tile
    programs pickle, so that they reach distributed workers as plain data)."""

    def __init__(self, target: str):
        self.target = target

    def __call__(self, ctx, *a, **k):
        module = ctx.module(self.target)
        if getattr(module, "inplace", False) and a and isinstance(a[0], torch.Tensor):
            copied = out_of_place(module)  # nn.ReLU(inplace=True) and kin
            if copied is None:
                a = (a[0].clone(),) + a[1:]
            else:
                module = copied
        return module(*a, **k)


def out_of_place(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` with ``inplace=False`` (its parameters shared), made
    per call: one pass over the tile, where a clone and the in-place op were two
    (FaultSSL's InstanceNorm-ReLU pairs: 1,706 clones, 7% of a run). Made afresh, it
    sees the module's attributes as they are now (a slope changed between runs). Only
    torch.nn's own modules, whose forward reads ``self.inplace``; another module's
    input is cloned as before. The model's module itself is left as it is: threads
    share it."""
    if not type(module).__module__.startswith("torch.nn."):
        return None
    found = copy.copy(module)
    found.inplace = False
    return found


class CallFunction:
    """Call ``fn`` out of place; ATen OpOverloads by name (they do not pickle, and
    workers may be other processes)."""

    def __init__(self, fn):
        self.fn = AtenCall(fn) if isinstance(fn, torch._ops.OpOverload) else fn

    def __call__(self, ctx, *a, **k):
        return self.fn(*a, **{**k, "inplace": False} if k.get("inplace") else k)


class CallMethod:
    """Call tensor method ``name``, out of place (``x.add_(y)`` -> ``x.add(y)``)."""

    def __init__(self, name: str):
        self.name = name[:-1] if name.endswith("_") and not name.startswith("__") else name

    def __call__(self, ctx, self_, *a, **k):
        return getattr(self_, self.name)(*a, **k)


def node_call(node: fx.Node):
    """The callable that runs what ``node`` calls."""
    if node.op == "call_module":
        return CallModule(node.target)
    if node.op == "call_method":
        return CallMethod(node.target)
    return CallFunction(node.target)
