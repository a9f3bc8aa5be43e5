"""Padding and cropping of the spatial axes: a region shift with a border fill.

F.pad and the nn.*Pad3d modules pad (negative pads crop); ``x[:, :, a:b]`` (captured
as ``aten.slice``) crops. Both only move the region an output tile reads; the fill
gives what it reads past the volume. Padding or slicing the channels is per voxel.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..geometry import Interval
from .base import LocalOp
from .fill import ZEROS, Fill, fill_for
from .pointwise import pointwise


@dataclass
class Pad(LocalOp):
    """F.pad / nn.*Pad3d over the spatial axes (negative pads crop)."""

    pad_lo: tuple = (0, 0, 0)
    fill: Fill = ZEROS

    def __post_init__(self):
        self.fills = (self.fill,)

    def need(self, axis, out):
        p = self.pad_lo[axis]
        return (Interval(out.lo - p, out.hi - p),)

    def run(self, ctx, inputs, out):
        return inputs[0]


def pad(ctx, pads, mode, value) -> Pad:
    """A spatial pad from F.pad's list (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)."""
    ctx.template()
    pads = list(pads) + [0] * (6 - len(pads))
    fill = fill_for(mode, value)
    if fill is None:
        ctx.unsupported(f"pad mode {mode!r}")
    return Pad(pad_lo=(pads[4], pads[2], pads[0]), fill=fill)


def pad_module(ctx, mode: str) -> Pad:
    """An nn.*Pad3d module, whose class says its ``mode``."""
    m = ctx.module
    return pad(ctx, m.padding, mode, getattr(m, "value", 0.0))


def constant_pad_module(ctx) -> Pad:
    return pad_module(ctx, "constant")


def reflection_pad_module(ctx) -> Pad:
    return pad_module(ctx, "reflect")


def replication_pad_module(ctx) -> Pad:
    return pad_module(ctx, "replicate")


def circular_pad_module(ctx) -> Pad:
    return pad_module(ctx, "circular")


def pad_function(ctx):
    """F.pad(input, pad, mode, value); pads of the channels (HighResNet's residuals)
    are per voxel."""
    pads = list(ctx.param(1, "pad"))
    if any(pads[6:]):
        if any(pads[:6]) or any(pads[8:]):
            ctx.unsupported(f"it pads {pads}: channel padding together with spatial or "
                            "batch padding")
        return pointwise(ctx, macs=0)
    return pad(ctx, pads, ctx.param(2, "mode", "constant"), ctx.param(3, "value", 0.0) or 0.0)


def crop(ctx):
    """``aten.slice.Tensor(x, dim, start, end, step)``: on a spatial axis a crop (a region
    shift), on the batch of one or the channels a per-voxel selection."""
    dim = ctx.param(1, "dim", 0) % 5
    start = ctx.param(2, "start") or 0
    step = ctx.param(4, "step", 1)
    if step != 1:
        ctx.unsupported(f"it slices with step {step}")
    if dim in (0, 1):
        return pointwise(ctx, macs=0)
    ctx.template()
    n = ctx.meta(ctx.arg(0, "self")).shape[dim]
    start = start + n if start < 0 else min(start, n)
    lo = [0, 0, 0]
    lo[dim - 2] = -start
    return Pad(pad_lo=tuple(lo))
