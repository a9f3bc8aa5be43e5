"""Ops along the channel axis: per voxel, so tiles need no halo (cat, softmax over
channels, channel repeats, channels-last blocks). Along a spatial axis they would be
global, and are refused."""
from __future__ import annotations

import torch.fx as fx

from .pointwise import pointwise


class ChannelsLastBlock(fx.GraphModule):
    """A chain of per-voxel ops that runs with channels last: (1, C, z, y, x) in,
    (1, C', z, y, x) out (made by `volarray.layout.fuse_channels_last`)."""


def channel_dim_only(ctx, dim) -> None:
    dim = ctx.static(dim, "dim")
    if dim not in (1, -4):
        ctx.unsupported(f"it acts along dim={dim}; only the channel dim (1) is local")


def cat(ctx):
    """torch.cat(tensors, dim=0)."""
    channel_dim_only(ctx, ctx.arg(1, "dim", 0))
    return pointwise(ctx, macs=4)


# over channels, channels last: 6.8-7.2 times a ReLU's cost per byte of output
# (`benchmarks/results/op_rates.md`)
SOFTMAX_PASSES = 7.0


def softmax(ctx, dim, monotone: bool = True):
    """Softmax and log-softmax over channels: increasing in each channel's score."""
    channel_dim_only(ctx, dim)
    op = pointwise(ctx, macs=4, monotone=monotone)
    op.memory_passes = SOFTMAX_PASSES
    return op


def softmax_function(ctx):
    """torch.softmax(x, dim), F.log_softmax(x, dim), x.softmax(dim), ..."""
    return softmax(ctx, ctx.arg(1, "dim"))


def softmax_module(ctx):
    """nn.Softmax, nn.LogSoftmax."""
    return softmax(ctx, ctx.module.dim)


def softmin_module(ctx):
    """nn.Softmin: decreasing, so an argmax head may not skip it."""
    return softmax(ctx, ctx.module.dim, monotone=False)


def channel_repeat(ctx, reps):
    """``x.repeat(1, k, 1, 1, 1)`` is per voxel; repeats of other dims are refused."""
    if len(reps) != 5 or reps[0] != 1 or any(r != 1 for r in reps[2:]):
        ctx.unsupported(f"it repeats {tuple(reps)}; only the channel dim may be repeated")
    return pointwise(ctx, macs=0)


def repeat_function(ctx):
    """aten.repeat(self, repeats)."""
    return channel_repeat(ctx, list(ctx.param(1, "repeats")))


def repeat_method(ctx):
    """x.repeat(1, k, 1, 1, 1) or x.repeat((1, k, 1, 1, 1)) (VNet's input transition)."""
    reps = [ctx.static(r, "repeats") for r in ctx.node.args[1:]]
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = list(reps[0])
    return channel_repeat(ctx, reps)


def channels_last_block(ctx):
    """A fused per-voxel chain run channels-last (ConvNeXt's LayerNorm/Linear/GELU)."""
    return pointwise(ctx, macs=2 * ctx.c_in)
