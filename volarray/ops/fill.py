"""What a tile sees outside the true volume: padding semantics per border mode.

A consumer asks its producer for a region that may reach past the volume's
edge. Inside the volume the producer's computed values are used; outside, the
values are what the whole-volume layer would have padded with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Box, Interval


@dataclass(frozen=True)
class Fill:
    """A border mode: "constant" (with value), "reflect", "replicate", "circular",
    or "inside" (the region never leaves the volume)."""

    mode: str
    value: float = 0.0

    @property
    def constant(self) -> bool:
        return self.mode in ("constant", "inside")


INSIDE = Fill("inside")
ZEROS = Fill("constant", 0.0)
NEG_INF = Fill("constant", float("-inf"))
_BY_MODE = {"zeros": ZEROS, "reflect": Fill("reflect"), "replicate": Fill("replicate"),
            "circular": Fill("circular")}


def fill_for(mode: str, value: float = 0.0) -> Fill | None:
    """The fill of a padding mode (nn.Conv3d's padding_mode, F.pad's mode); None for a
    mode without one."""
    if mode == "constant":
        return Fill("constant", float(value))
    return _BY_MODE.get(mode)


def index_map(idx: np.ndarray, n: int, fill: Fill) -> np.ndarray:
    """Where each (possibly outside) index reads from in a volume of size ``n``."""
    if fill.mode == "reflect":
        idx = np.where(idx < 0, -idx, idx)
        idx = np.where(idx >= n, 2 * (n - 1) - idx, idx)
        return np.clip(idx, 0, n - 1)
    if fill.mode == "replicate":
        return np.clip(idx, 0, n - 1)
    if fill.mode == "circular":
        return np.mod(idx, n)
    raise ValueError(f"no index map for fill mode {fill.mode!r}")


def source_interval(want: Interval, n: int, fill: Fill) -> Interval:
    """The part of a producer (size ``n``) needed to serve ``want`` under ``fill``."""
    if fill.constant or want.empty:
        return want.clip(n)
    idx = index_map(np.arange(want.lo, want.hi), n, fill)
    return Interval(int(idx.min()), int(idx.max()) + 1)


def extend(t: torch.Tensor | None, have: Box, want: Box, valid: tuple[int, ...], fill: Fill,
           channels: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Values of region ``want`` from tensor ``t`` covering ``have`` (shape (1, C, *have))."""
    if fill.constant:
        inner = want.intersect(Box.from_bounds((0, 0, 0), valid))
        if inner.empty or t is None:
            return torch.full((1, channels) + want.shape, fill.value, dtype=dtype, device=device)
        piece = t[(slice(None), slice(None)) + inner.slices(have.lo)]
        pads = []
        for w, i in reversed(list(zip(want.axes, inner.axes))):
            pads += [i.lo - w.lo, w.hi - i.hi]
        if any(pads):
            piece = F.pad(piece, pads, value=fill.value)
        return piece
    out = t
    for axis, (w, h, n) in enumerate(zip(want.axes, have.axes, valid)):
        idx = index_map(np.arange(w.lo, w.hi), n, fill) - h.lo
        dim = axis + 2
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            out = out.narrow(dim, int(idx[0]), len(idx))
        else:
            out = out.index_select(dim, torch.as_tensor(idx, device=out.device))
    return out
