"""Global reductions across chunks: per-chunk (count, mean, M2), merged pairwise.

Statistics of a tensor are computed over each chunk's own region (never its
halo), per channel or per group, and merged with Chan et al.'s parallel update,
in float64, as a dask tree (chunk -> combine -> aggregate). Whole-volume
InstanceNorm, GroupNorm (`volarray.ops.norm`) and global average pooling (built
here) then follow exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .base import LocalOp, triple


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
    var, mean = channel_var_mean(x)
    n = float(np.prod(x.shape[2:]))
    per_channel = np.stack([np.full(x.shape[1], n), mean.double().cpu().numpy(),
                            var.double().cpu().numpy() * n])
    if groups == x.shape[1]:
        return per_channel
    per = x.shape[1] // groups
    return np.stack([stats_combine(list(per_channel[:, g * per:(g + 1) * per].T[:, :, None]))[:, 0]
                     for g in range(groups)], axis=1)


SMALL_TILE = 1 << 16  # values: below, torch.var_mean's one call costs less than a loop
STATS_BLOCK = 1 << 14  # rows (voxels) of a channels-last tile per pass: a few MB, in cache


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (biased) variance and mean of a (1, C, z, y, x) tile.

    A channels-last CPU tile is a (voxels, C) matrix: its mean is a column sum (about
    20 GB/s here) and its M2 a second pass over blocks of rows, each block's
    deviations squared while in cache. torch.var_mean over dims (0, 2, 3, 4) ran at
    1.2 GB/s on such a tile (2-5 GB/s this way; InstanceNorm and GroupNorm networks
    spend a tenth of their time in statistics). Other layouts and devices keep
    torch.var_mean, and so do small tiles."""
    c = x.shape[1]
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last_3d) \
            or x.dtype != torch.float32 or x.numel() < SMALL_TILE:
        return torch.var_mean(x, dim=(0, 2, 3, 4), correction=0)
    rows = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # a view: no copy
    n = rows.shape[0]
    mean = rows.sum(0) / n  # a first estimate
    dev = torch.zeros(c, dtype=torch.float64)  # sum of deviations from it: its error
    m2 = torch.zeros(c, dtype=torch.float64)
    d = torch.empty(min(STATS_BLOCK, n), c, dtype=x.dtype)
    for i in range(0, n, STATS_BLOCK):
        block = d[:min(STATS_BLOCK, n - i)]
        torch.sub(rows[i:i + STATS_BLOCK], mean, out=block)
        dev += block.sum(0).double()
        block.mul_(block)
        m2 += block.sum(0).double()
    # the corrected two-pass algorithm (Chan, Golub and LeVeque): the first estimate's
    # error taken out of both
    return ((m2 - dev * dev / n) / n).float(), (mean.double() + dev / n).float()


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


# ------------------------------------------------------------ spreading a value
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


# ------------------------------------------------------------ global means
def global_mean(ctx) -> GlobalNode | None:
    """The mean of the volume per channel, a barrier's value (SE blocks, ASPP image
    pooling); None when the tensor averaged is not the volume."""
    source = ctx.spatial_input(0)
    if source is None:
        return None
    return GlobalNode(ctx.name, "reduce", ctx.where, source=source, groups=ctx.c_in,
                      output="mean", shape=tuple(ctx.value.shape))


def adaptive_avg_pool(ctx, size) -> GlobalNode | None:
    """Adaptive average pooling is exact to size 1 only: a global mean."""
    if triple(size) != (1, 1, 1):
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        ctx.unsupported(f"adaptive pooling to {size} (only to 1, a global mean, is exact)")
    return global_mean(ctx)


def adaptive_avg_pool_module(ctx) -> GlobalNode | None:
    return adaptive_avg_pool(ctx, ctx.module.output_size)


def adaptive_avg_pool_function(ctx) -> GlobalNode | None:
    return adaptive_avg_pool(ctx, ctx.param(1, "output_size"))


def mean(ctx) -> GlobalNode | None:
    """torch.mean(x, dim) and x.mean(dim) over the three spatial dims; other means have
    no tile kernel."""
    dims = ctx.param(1, "dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if sorted(d % 5 for d in dims) != [2, 3, 4]:
        return None
    return global_mean(ctx)
