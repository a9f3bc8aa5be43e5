"""What a tile op is: the `LocalOp` interface, and the markers its call arguments hold.

Each op answers two questions: which region of each spatial input does an output
region need (per axis, with the border mode it reads past the volume with), and how
to compute exactly that output region from those inputs. Ops are computed unpadded
("valid") on inputs that the executor has already extended by the layer's own padding
semantics, so a tile equals the whole-volume result.

A tile op's call arguments are built when the model is traced and resolved on the
worker: parameters (`Attr`), the tile's spatial inputs (`SpatialArg`) and whole-volume
values (`GlobalArg`) stand in them as markers. The markers live here, beside `resolve`,
so that every op module (local kernels and reductions alike) can use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ..geometry import Box, Interval
from .fill import Fill


@dataclass(frozen=True)
class Attr:
    """A parameter or buffer of the traced model, resolved on the worker."""

    path: str


@dataclass(frozen=True)
class SpatialArg:
    """Placeholder for the i-th spatial input of a node inside its call arguments."""

    index: int


@dataclass(frozen=True)
class GlobalArg:
    """A whole-volume value (statistics, a pooled vector) inside call arguments."""

    name: str


def resolve(obj, ctx, inputs=()):
    """Replace Attr / SpatialArg / GlobalArg markers inside nested call arguments."""
    if isinstance(obj, SpatialArg):
        return inputs[obj.index]
    if isinstance(obj, Attr):
        return ctx.attr(obj.path)
    if isinstance(obj, GlobalArg):
        return ctx.global_value(obj.name)
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(o, ctx, inputs) for o in obj)
    if isinstance(obj, dict):
        return {k: resolve(v, ctx, inputs) for k, v in obj.items()}
    return obj


def global_names(obj) -> tuple[str, ...]:
    """The names of the whole-volume values inside nested call arguments."""
    if isinstance(obj, GlobalArg):
        return (obj.name,)
    if isinstance(obj, (list, tuple)):
        return tuple(n for o in obj for n in global_names(o))
    if isinstance(obj, dict):
        return global_names(tuple(obj.values()))
    return ()


def call_arg(args, kwargs, i: int, name: str, default=None):
    """Argument ``i`` (or keyword ``name``) of a call's resolved-later arguments."""
    return args[i] if len(args) > i else kwargs.get(name, default)


def triple(v) -> tuple[int, int, int]:
    """A per-axis hyper-parameter (kernel, stride, ...) as three ints."""
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return (int(v[0]),) * 3
        return tuple(int(i) for i in v)
    return (int(v),) * 3


def window(out: Interval, k: int, s: int, d: int, p: int) -> Interval:
    """Input positions read by a sliding window (conv, pooling) over ``out``."""
    return Interval(out.lo * s - p, (out.hi - 1) * s - p + d * (k - 1) + 1)


@dataclass
class LocalOp:
    """Base: one output tensor, ``n_inputs`` spatial inputs."""

    n_inputs: int = 1
    fills: tuple[Fill, ...] = ()
    scale: tuple[Fraction, Fraction, Fraction] = (Fraction(1),) * 3  # output/input grid ratio
    macs: float = 1.0  # multiply-adds per output voxel (all channels), for cost estimates
    scratch_channels: int = 0  # temporaries per output voxel beyond the output, for memory
    # memory-bound work per byte of output as a multiple of a ReLU's, charged at the
    # memory rate (`benchmarks/bench_op_rates.py`; `benchmarks/results/op_rates.md`)
    memory_passes: float = 1.0
    # a ReLU right after this op may run inside its kernel (``run(..., relu=True)``)
    takes_relu = False
    # this op is a plain ReLU of its one input (fusable into the op before it)
    is_relu = False

    def need(self, axis: int, out: Interval) -> tuple[Interval, ...]:
        raise NotImplementedError

    def run(self, ctx, inputs: list[torch.Tensor], out: Box) -> torch.Tensor:
        raise NotImplementedError

    @property
    def changes_resolution(self) -> bool:
        return any(s != 1 for s in self.scale)

    @property
    def globals(self) -> tuple[str, ...]:
        """Whole-volume values (norm statistics, pooled vectors) the op reads."""
        return global_names((getattr(self, "args", ()), getattr(self, "kwargs", {})))
