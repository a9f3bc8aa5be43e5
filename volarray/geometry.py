"""Small immutable geometry objects: 1-D intervals, 3-D boxes and chunk grids.

Every local op of a CNN acts on each spatial axis independently, so the planner
propagates 1-D intervals per axis and a tile's region is their product.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np

from .errors import InputError

SPATIAL = 3


@dataclass(frozen=True)
class Interval:
    """Half-open index range ``[lo, hi)`` on one axis; may reach outside the volume."""

    lo: int
    hi: int

    def __post_init__(self):
        if self.hi < self.lo:
            raise ValueError(f"Interval hi={self.hi} is below lo={self.lo}")

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo

    def clip(self, n: int) -> "Interval":
        lo, hi = max(self.lo, 0), min(self.hi, n)
        return Interval(lo, max(lo, hi))

    def union(self, other: "Interval") -> "Interval":
        if self.empty:
            return other
        if other.empty:
            return self
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))

    def contains(self, other: "Interval") -> bool:
        return other.empty or (self.lo <= other.lo and other.hi <= self.hi)

    def __repr__(self) -> str:
        return f"[{self.lo}:{self.hi})"


EMPTY = Interval(0, 0)


@dataclass(frozen=True)
class Box:
    """A product of three intervals (z, y, x)."""

    axes: tuple[Interval, Interval, Interval]

    @classmethod
    def from_bounds(cls, lo: Sequence[int], hi: Sequence[int]) -> "Box":
        return cls(tuple(Interval(int(a), int(b)) for a, b in zip(lo, hi)))

    @property
    def lo(self) -> tuple[int, ...]:
        return tuple(i.lo for i in self.axes)

    @property
    def hi(self) -> tuple[int, ...]:
        return tuple(i.hi for i in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.axes)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def empty(self) -> bool:
        return any(i.empty for i in self.axes)

    def slices(self, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...]:
        """Slices selecting this box inside an array whose first voxel is ``origin``."""
        return tuple(slice(i.lo - o, i.hi - o) for i, o in zip(self.axes, origin))

    def intersect(self, other: "Box") -> "Box":
        out = []
        for a, b in zip(self.axes, other.axes):
            lo, hi = max(a.lo, b.lo), min(a.hi, b.hi)
            out.append(Interval(lo, max(lo, hi)))
        return Box(tuple(out))

    def __repr__(self) -> str:
        return "Box(" + ", ".join(map(repr, self.axes)) + ")"


def coerce_chunks(chunks, shape: Sequence[int]) -> tuple[int, int, int] | None:
    """Canonicalize the user's ``chunks`` (int or 3-tuple, per spatial axis) once."""
    if chunks is None:
        return None
    if isinstance(chunks, (int, np.integer)):
        chunks = (int(chunks),) * SPATIAL
    try:
        chunks = tuple(chunks)
    except TypeError:
        raise InputError(
            f"chunks={chunks!r} is neither an int nor a (z, y, x) tuple; "
            "pass e.g. chunks=128 or chunks=(64, 128, 128)") from None
    if len(chunks) != SPATIAL or not all(isinstance(c, (int, np.integer)) for c in chunks):
        raise InputError(
            f"chunks={chunks!r} must be one int or three ints (z, y, x); "
            "pass e.g. chunks=(64, 128, 128)")
    if any(c <= 0 for c in chunks):
        raise InputError(f"chunks={chunks!r} has a non-positive size; every chunk side must be >= 1")
    return tuple(min(int(c), int(n)) for c, n in zip(chunks, shape))


def chunk_bounds(n: int, chunk: int) -> tuple[int, ...]:
    """Chunk boundaries ``0, c, 2c, ..., n`` along one axis."""
    return tuple(range(0, n, chunk)) + (n,)


def scaled_bounds(bounds: Sequence[int], scale: Fraction, n: int) -> tuple[int, ...]:
    """Map chunk boundaries of the input grid onto a node's grid of size ``n``.

    Any partition is exact (tiles compute arbitrary regions); mapping the input
    grid keeps the tiles of all stages aligned to the cumulative stride.
    """
    out = [0]
    for b in bounds[1:-1]:
        m = min(n, int(round(b * scale)))
        if m > out[-1]:
            out.append(m)
    if n > out[-1]:
        out.append(n)
    return tuple(out)


def intervals(bounds: Sequence[int]) -> list[Interval]:
    return [Interval(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def grid_boxes(bounds: Sequence[Sequence[int]]) -> Iterator[tuple[tuple[int, ...], Box]]:
    """All (chunk index, box) pairs of a grid given per-axis boundaries."""
    per_axis = [intervals(b) for b in bounds]
    for idx in np.ndindex(*(len(p) for p in per_axis)):
        yield tuple(int(i) for i in idx), Box(tuple(per_axis[a][i] for a, i in enumerate(idx)))


def chunk_range(bounds: Sequence[int], want: Interval) -> range:
    """Indices of the chunks along one axis that overlap ``want``."""
    if want.empty:
        return range(0)
    b = np.asarray(bounds)
    first = int(np.searchsorted(b, want.lo, side="right")) - 1
    last = int(np.searchsorted(b, want.hi, side="left"))
    return range(max(first, 0), min(last, len(b) - 1))


def nominal_scale(n: int, n_in: int) -> Fraction:
    """A node's grid ratio to the input, snapped to a power of two when close
    (odd sizes halved by a stride still count as 1/2). It only aligns chunks:
    tiles are exact for any partition."""
    for k in range(13):  # n_in halved k times, rounding either way (2 from 40: 1/16)
        m = 2 ** k
        if n in (n_in // m, -(-n_in // m)):
            return Fraction(1, m)
        if n == n_in * m:
            return Fraction(m)
    r = n / n_in
    k = round(np.log2(r))
    if abs(np.log2(r) - k) < 0.3:
        return Fraction(2) ** k
    return max(Fraction(n, n_in).limit_denominator(8), Fraction(1, n_in))
