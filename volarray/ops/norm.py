"""Normalization layers: with statistics of the input (InstanceNorm, GroupNorm) a
barrier, whose whole-volume statistics `volarray.ops.reduce` gathers and `NormApply`
applies per tile; with running statistics (eval BatchNorm, InstanceNorm with
track_running_stats) per voxel."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .base import LocalOp, call_arg, resolve
from .fill import INSIDE
from .pointwise import pointwise
from .reduce import GlobalNode


@dataclass
class NormApply(LocalOp):
    """(x - mean) / sqrt(var + eps) * weight + bias with whole-volume statistics."""

    stats: str = ""  # GlobalNode name
    groups: int = 1
    eps: float = 1e-5
    weight: object = None
    bias: object = None

    def __post_init__(self):
        self.fills = (INSIDE,)

    @property
    def globals(self) -> tuple[str, ...]:
        return (self.stats,)

    def need(self, axis, out):
        return (out,)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        c = x.shape[1]
        n, mean, m2 = ctx.global_value(self.stats)
        per = c // self.groups

        def channel(v):  # group statistics repeated per channel
            return torch.as_tensor(np.repeat(v, per), dtype=x.dtype, device=x.device)
        w, b = resolve((self.weight, self.bias), ctx)
        # eval-mode batch_norm with the whole-volume statistics: one fused pass, as
        # PyTorch's own instance_norm is batch_norm with per-instance statistics
        return F.batch_norm(x, channel(mean), channel(m2 / n), w, b, False, 0.0, self.eps)


def norm(ctx, groups: int, eps: float, weight, bias):
    """Statistics of the input per group (a whole-volume value), then applied per
    tile; None when the normalized tensor is not the volume."""
    source = ctx.spatial_input(0)
    if source is None:
        return None
    stats = f"{ctx.name}__stats"
    ctx.add_global(GlobalNode(stats, "reduce", ctx.where, source=source, groups=groups))
    if ctx.c_in % groups:
        ctx.unsupported(f"{ctx.c_in} channels in {groups} groups")
    return NormApply(n_inputs=1, stats=stats, groups=groups, eps=float(eps), weight=weight,
                     bias=bias, macs=4.0 * ctx.c_in)


def module_affine(ctx):
    """A norm module's (weight, bias) markers, or (None, None)."""
    if not ctx.module.affine:
        return None, None
    return ctx.attr("weight"), ctx.attr("bias")


def function_affine(ctx, weight_index: int):
    """A norm functional's (weight, bias), at ``weight_index`` and after it."""
    args, kwargs = ctx.template()
    return (call_arg(args, kwargs, weight_index, "weight"),
            call_arg(args, kwargs, weight_index + 1, "bias"))


def instance_norm_module(ctx):
    m = ctx.module
    if m.track_running_stats and not m.training:
        return pointwise(ctx, macs=2)  # running statistics: per voxel, like BatchNorm
    return norm(ctx, ctx.c_in, m.eps, *module_affine(ctx))


def instance_norm_function(ctx):
    """F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
    momentum, eps)."""
    if not ctx.param(5, "use_input_stats", True):
        return pointwise(ctx, macs=2)
    eps = ctx.param(7, "eps", 1e-5)
    return norm(ctx, ctx.c_in, eps, *function_affine(ctx, 3))


def group_norm_module(ctx):
    m = ctx.module
    return norm(ctx, m.num_groups, m.eps, *module_affine(ctx))


def group_norm_function(ctx):
    """F.group_norm(input, num_groups, weight, bias, eps)."""
    groups = ctx.param(1, "num_groups")
    eps = ctx.param(4, "eps", 1e-5)
    return norm(ctx, groups, eps, *function_affine(ctx, 2))


def batch_norm_module(ctx):
    m = ctx.module
    if m.training or not m.track_running_stats:
        ctx.unsupported("BatchNorm in training mode uses batch statistics; call "
                        "model.eval() first")
    return pointwise(ctx, macs=2)


def batch_norm_function(ctx):
    """F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)."""
    if ctx.param(5, "training", False):
        ctx.unsupported("batch_norm is called with training=True")
    return pointwise(ctx, macs=2)
