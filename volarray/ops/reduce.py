"""Global reductions across chunks: per-chunk (count, mean, M2), merged pairwise.

Statistics of a tensor are computed over each chunk's own region (never its
halo), per channel or per group, and merged with Chan et al.'s parallel update,
in float64, as a dask tree (chunk -> combine -> aggregate). Whole-volume
InstanceNorm, GroupNorm and global average pooling then follow exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .fill import INSIDE
from .local import LocalOp, resolve


@dataclass(frozen=True)
class GlobalArg:
    """A whole-volume value (statistics, a pooled vector) inside call arguments."""

    name: str


@dataclass
class GlobalNode:
    """A value computed once for the whole volume.

    ``reduce``: statistics of spatial node ``source`` per group of channels;
    ``eval``: the fx node evaluated on other global values (an SE block's MLP).
    """

    name: str
    kind: str  # "reduce" | "eval"
    where: str
    source: str | None = None  # reduce: the spatial node reduced
    groups: int = 1  # reduce: number of statistic groups (channels for per-channel)
    output: str = "stats"  # reduce: "stats" (count, mean, M2) or "mean" (a tensor)
    shape: tuple = ()  # the value's shape when it is a tensor
    call: object = None  # eval: callable(ctx, *args, **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    deps: tuple[str, ...] = ()  # global inputs


# ------------------------------------------------------------ chunk / combine / agg
def stats_chunk(x: torch.Tensor, groups: int) -> np.ndarray:
    """(3, groups) float64: count, mean, M2 of a (1, C, z, y, x) tile per group.

    Per channel first (torch.var_mean, two-pass within the tile, any memory
    layout), then channels merged into their groups in float64."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
    n = float(np.prod(x.shape[2:]))
    per_channel = np.stack([np.full(x.shape[1], n), mean.double().cpu().numpy(),
                            var.double().cpu().numpy() * n])
    if groups == x.shape[1]:
        return per_channel
    per = x.shape[1] // groups
    return np.stack([stats_combine(list(per_channel[:, g * per:(g + 1) * per].T[:, :, None]))[:, 0]
                     for g in range(groups)], axis=1)


def stats_combine(parts: list[np.ndarray]) -> np.ndarray:
    """Pairwise (Chan et al.) merge of (count, mean, M2) rows."""
    n, mean, m2 = parts[0]
    for other in parts[1:]:
        nb, mb, m2b = other
        tot = n + nb
        delta = mb - mean
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(tot > 0, nb / np.where(tot > 0, tot, 1), 0)
        mean = mean + delta * w
        m2 = m2 + m2b + delta ** 2 * n * w
        n = tot
    return np.stack([n, mean, m2])


def stats_value(stats: np.ndarray, node: GlobalNode, dtype=torch.float32):
    """The aggregate: the statistics themselves, or the mean as the model's tensor."""
    if node.output == "mean":
        return torch.as_tensor(stats[1], dtype=dtype).reshape(node.shape)
    return stats


# ------------------------------------------------------------ tile ops using them
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


@dataclass
class Broadcast(LocalOp):
    """A whole-volume (1, C, 1, 1, 1) value spread over the tile (interpolate or
    expand of a pooled vector back to full size, as in ASPP image pooling)."""

    source: str = ""

    def __post_init__(self):
        self.n_inputs = 0
        self.fills = ()

    @property
    def globals(self) -> tuple[str, ...]:
        return (self.source,)

    def need(self, axis, out):
        return ()

    def run(self, ctx, inputs, out):
        v = ctx.global_value(self.source)
        return v.reshape(v.shape[:2] + (1, 1, 1)).expand(v.shape[:2] + out.shape).contiguous(
            memory_format=torch.channels_last_3d)
