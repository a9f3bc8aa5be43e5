"""Dropout: an identity in eval mode; left active (MC dropout), masks drawn from a hash
of the voxel's global position, so that every chunking draws the same mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LocalOp
from .fill import INSIDE
from .pointwise import pointwise

_MASK64 = (1 << 64) - 1


def signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 of the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2 = signed(0xBF58476D1CE4E5B9), signed(0x94D049BB133111EB)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping products, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


@dataclass
class PositionalDropout(LocalOp):
    """Dropout left active (MC dropout), with masks drawn from a hash of the sample
    seed, the layer and the voxel's global position: every chunking, tile and
    scheduler draws the same mask, so samples are reproducible and seam-free."""

    p: float = 0.5
    channelwise: bool = False  # Dropout3d: one draw per channel
    layer: int = 0
    full_shape: tuple = (1, 1, 1)

    def __post_init__(self):
        self.fills = (INSIDE,)

    def need(self, axis, out):
        return (out,)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        c = x.shape[1]
        key = int(mix(torch.tensor(signed(getattr(ctx, "seed", 0) * 1_000_003 + self.layer))))
        idx = torch.arange(c, dtype=torch.int64, device=x.device).reshape(1, c, 1, 1, 1)
        if not self.channelwise:
            for axis, iv in enumerate(out.axes):
                shape = [1, 1, 1, 1, 1]
                shape[axis + 2] = len(iv)
                coord = torch.arange(iv.lo, iv.hi, dtype=torch.int64, device=x.device)
                idx = idx * self.full_shape[axis] + coord.reshape(shape)
        u = ((mix(idx ^ key) >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
        keep = (u >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


def dropout(ctx, p, training, channelwise=False, alpha=False):
    """Active with p > 0: positional masks, layers numbered in graph order; else an
    identity. Alpha dropout, active, has no positional form."""
    if training and p > 0:  # left active on purpose: MC dropout
        if alpha:
            ctx.unsupported("alpha_dropout in training mode")
        ctx.template()
        return PositionalDropout(p=float(p), channelwise=channelwise,
                                 layer=ctx.serial("dropout"), full_shape=ctx.out_shape,
                                 macs=2.0)
    return pointwise(ctx, macs=0, monotone=True)


def dropout_module(ctx):
    m = ctx.module
    return dropout(ctx, m.p, m.training, isinstance(m, (nn.Dropout3d, nn.Dropout2d)),
                   isinstance(m, nn.AlphaDropout))


def dropout_function(ctx):
    """F.dropout(input, p, training), F.dropout3d, ..."""
    fn = ctx.node.target
    p = ctx.param(1, "p", 0.5)
    return dropout(ctx, p, ctx.param(2, "training", True), fn in (F.dropout3d, F.dropout2d),
                   fn is F.alpha_dropout)
