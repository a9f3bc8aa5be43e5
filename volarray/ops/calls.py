"""A captured node as a callable a worker can run: ``call(ctx, *args, **kwargs)``.

Per-voxel tile ops and whole-volume evaluations call the node's own target on resolved
arguments. Ops never write into their inputs here: a tile's input may be a view of rows
that a swept task keeps for its next slab (the whole-volume forward ran its readers
first).
"""
from __future__ import annotations

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


def call_module(target: str):
    """Call the traced model's submodule ``target``."""
    def call(ctx, *a, **k):
        module = ctx.module(target)
        if getattr(module, "inplace", False) and a and isinstance(a[0], torch.Tensor):
            a = (a[0].clone(),) + a[1:]  # nn.ReLU(inplace=True) and kin
        return module(*a, **k)
    return call


def call_function(fn):
    """Call ``fn``; ATen OpOverloads by name (they do not pickle, and workers may be
    other processes)."""
    if isinstance(fn, torch._ops.OpOverload):
        fn = AtenCall(fn)
    return lambda ctx, *a, **k: fn(*a, **{**k, "inplace": False} if k.get("inplace") else k)


def call_method(name: str):
    """Call tensor method ``name``, out of place (``x.add_(y)`` -> ``x.add(y)``)."""
    if name.endswith("_") and not name.startswith("__"):
        name = name[:-1]
    return lambda ctx, self, *a, **k: getattr(self, name)(*a, **k)


def node_call(node: fx.Node):
    """The callable that runs what ``node`` calls."""
    if node.op == "call_module":
        return call_module(node.target)
    if node.op == "call_method":
        return call_method(node.target)
    return call_function(node.target)
