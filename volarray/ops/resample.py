"""Nearest and trilinear interpolation (nn.Upsample, F.interpolate): the tile kernel,
PyTorch's source-index tables, and one builder for both forms."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Interval
from .base import LocalOp
from .fill import INSIDE


def scale_value(scale: float | None, n_in: int, n_out: int) -> np.float32:
    """PyTorch's compute_scales_value: 1/scale_factor if given, else in/out, as float32."""
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)
    return np.float32(n_in) / np.float32(n_out)


def resample_indices(mode: str, n_in: int, n_out: int, scale: float | None,
                     align_corners: bool | None):
    """Per-output-voxel source indices (and linear weights) exactly as PyTorch's
    CPU upsampling kernels compute them, in float32, over the whole axis."""
    o = np.arange(n_out)
    if n_in == n_out:
        return o, o, np.zeros(n_out, np.float32)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == 2 * n_in:
            idx = o >> 1
        else:
            s = scale_value(scale, n_in, n_out)
            off = np.float32(0.5) if mode == "nearest-exact" else np.float32(0.0)
            idx = np.minimum(np.floor((o.astype(np.float32) + off) * s).astype(np.int64), n_in - 1)
        return idx, idx, np.zeros(n_out, np.float32)
    if align_corners:
        s = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        real = s * o.astype(np.float32)
    else:
        s = scale_value(scale, n_in, n_out)
        real = s * (o.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
        real = np.where(real < 0, np.float32(0), real).astype(np.float32)
    i0 = real.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    lam = np.clip(real - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, lam


@dataclass
class Resample(LocalOp):
    """Nearest / trilinear interpolation by global source coordinates, so tiles
    reproduce the whole-volume index mapping, edge clamping and align_corners."""

    mode: str = "nearest"
    tables: tuple = ()  # per axis: (i0, i1, lambda1) over the whole output axis
    # Integer factors per axis when F.interpolate on a tile reproduces the whole-volume
    # mapping (same scale, no align_corners): then the fast native kernel is used.
    factors: tuple | None = None
    align_corners: bool | None = None

    def __post_init__(self):
        self.fills = (INSIDE,)

    def need(self, axis, out):
        i0, i1, _ = self.tables[axis]
        if out.empty:
            return (out,)
        return (Interval(int(i0[out.lo:out.hi].min()), int(i1[out.lo:out.hi].max()) + 1),)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        if self.factors is not None:
            mode = "trilinear" if self.mode == "linear" else self.mode
            y = F.interpolate(x, scale_factor=self.factors, mode=mode,
                              align_corners=self.align_corners if mode == "trilinear" else None)
            crop = []
            for axis, (iv, f) in enumerate(zip(out.axes, self.factors)):
                first = self.need(axis, iv)[0].lo * int(f)
                crop.append(slice(iv.lo - first, iv.hi - first))
            crop = tuple(crop)
            return y[(slice(None), slice(None)) + crop]
        for axis, iv in enumerate(out.axes):
            i0, i1, lam = (a[iv.lo:iv.hi] for a in self.tables[axis])
            base = self.need(axis, iv)[0].lo
            dim = axis + 2
            if (x.shape[dim] == len(iv) and not lam.any()
                    and np.array_equal(i0, np.arange(base, base + len(iv)))):
                continue  # identity along this axis
            x0 = x.index_select(dim, torch.as_tensor(i0 - base, device=x.device))
            if self.mode.startswith("nearest"):
                x = x0
                continue
            x1 = x.index_select(dim, torch.as_tensor(i1 - base, device=x.device))
            shape = [1] * x.dim()
            shape[dim] = len(iv)
            w1 = torch.as_tensor(lam, device=x.device, dtype=x.dtype).reshape(shape)
            x = x0 * (1 - w1) + x1 * w1
        return x


# trilinear x2, channels last: 8.3-8.8 times a ReLU's cost per byte of output (nearest:
# 1.4-1.5, left at 1) (`benchmarks/results/op_rates.md`)
LINEAR_PASSES = 8.5


def resample(ctx, mode, scale_factor, align_corners, recompute) -> Resample:
    """An interpolation from its arguments; the output size is the traced one."""
    if mode not in ("nearest", "nearest-exact", "trilinear", "linear"):
        ctx.unsupported(f"interpolation mode {mode!r}; nearest, nearest-exact and "
                        "trilinear are supported")
    in_shape, out_shape = ctx.in_shape, ctx.out_shape
    if scale_factor is None or recompute:
        scales = (None,) * 3
    elif isinstance(scale_factor, (tuple, list)):
        scales = tuple(float(s) for s in scale_factor)
    else:
        scales = (float(scale_factor),) * 3
    tables = tuple(resample_indices(mode, n_in, n_out, s, align_corners)
                   for n_in, n_out, s in zip(in_shape, out_shape, scales))
    # Nominal grid ratio, for chunk alignment only (tiles are exact for any ratio):
    # size=skip.shape[2:] on odd sizes still counts as a factor of 2.
    scale = tuple(Fraction(n_out, n_in).limit_denominator(4)
                  for n_in, n_out in zip(in_shape, out_shape))
    factors = None
    if not align_corners and all(o % i == 0 and (s is None or s == o // i)
                                 for i, o, s in zip(in_shape, out_shape, scales)):
        factors = tuple(float(o // i) for i, o in zip(in_shape, out_shape))
    return Resample(mode=mode, tables=tables, scale=scale, macs=8.0, factors=factors,
                    align_corners=align_corners,
                    memory_passes=1.0 if mode.startswith("nearest") else LINEAR_PASSES)


def upsample_module(ctx) -> Resample:
    m = ctx.module
    ctx.template()
    return resample(ctx, m.mode, m.scale_factor, m.align_corners, m.recompute_scale_factor)


def interpolate_function(ctx) -> Resample:
    """F.interpolate(input, size, scale_factor, mode, align_corners,
    recompute_scale_factor)."""
    ctx.template()
    return resample(ctx, ctx.param(3, "mode", "nearest"), ctx.param(2, "scale_factor"),
                    ctx.param(4, "align_corners"), ctx.param(5, "recompute_scale_factor"))
