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


AXIS_NAMES = ("z", "y", "x")

_CHUNK_FORMS = ("pass an int, three ints (z, y, x) or a dict {axis: int} over axes 0, 1, 2; "
                "a side is >= 1, -1 for the whole axis, or None / 'auto' for the planner's "
                "choice")


def _chunks_error(message: str) -> InputError:
    return InputError(message, parameter="chunks")


def _is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def _chunk_side(side, n: int, chunks, axis: int) -> int | None:
    """One axis of ``chunks``: a side >= 1 (clipped to the axis), -1 for the whole
    axis, or None / 'auto' for the planner's choice (None)."""
    if _is_auto(side):
        return None
    if isinstance(side, (bool, np.bool_)) or not isinstance(side, (int, np.integer)):
        raise _chunks_error(f"chunks={chunks!r} has {side!r} on axis {AXIS_NAMES[axis]}, "
                            f"which is not a chunk side; {_CHUNK_FORMS}")
    if side == -1:
        return int(n)
    if side <= 0:
        raise _chunks_error(f"chunks={chunks!r} has a non-positive side {int(side)} on axis "
                            f"{AXIS_NAMES[axis]}: every side must be >= 1, or -1 for the "
                            "whole axis (as in dask)")
    return min(int(side), int(n))


def _sides_of_dict(chunks: dict) -> tuple:
    """``{axis: side}`` as three sides, None (the planner's) on the axes not named."""
    sides = [None] * SPATIAL
    named = set()
    for axis, side in chunks.items():
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) \
                or not -SPATIAL <= axis < SPATIAL:
            raise _chunks_error(f"chunks={chunks!r} names axis {axis!r}; a dict's keys are the "
                                "spatial axes 0, 1, 2 (z, y, x) or -3, -2, -1, e.g. "
                                "chunks={0: 64}")
        a = int(axis) % SPATIAL
        if a in named:
            raise _chunks_error(f"chunks={chunks!r} names axis {AXIS_NAMES[a]} twice; name "
                                "each axis once, e.g. chunks={0: 64, 2: 128}")
        named.add(a)
        sides[a] = side
    return tuple(sides)


def coerce_chunks(chunks, shape: Sequence[int]) -> tuple[int | None, ...] | None:
    """Canonicalize the user's ``chunks``, the spatial (z, y, x) chunk shape of the
    output, once. Accepted, in dask's forms:

    - None or ``"auto"``: the planner chooses every side (returns None);
    - an int: that side on every axis; ``-1``: the whole volume as one chunk;
    - three sides (z, y, x), each an int >= 1, ``-1`` for the whole axis (as in dask),
      or None / ``"auto"``: the planner chooses that side, the others fixed (dask's
      None means "keep the input's chunking"; the output has none to keep);
    - a dict ``{axis: side}`` over axes 0, 1, 2 (or -3, -2, -1), sides as above; the
      axes not named are the planner's choice, as None is.

    Returns None where the planner chooses every side, else three sides, each an int
    clipped to the volume or None where the planner chooses. Anything else raises
    `InputError` naming the value and the forms accepted.
    """
    if _is_auto(chunks):
        return None
    if isinstance(chunks, dict):
        sides = _sides_of_dict(chunks)
    elif isinstance(chunks, (int, np.integer)) and not isinstance(chunks, (bool, np.bool_)):
        sides = (chunks,) * SPATIAL
    elif isinstance(chunks, (str, bytes, bool, np.bool_)) or not hasattr(chunks, "__iter__"):
        raise _chunks_error(f"chunks={chunks!r} is not a chunk shape; {_CHUNK_FORMS}, "
                            "e.g. chunks=128 or chunks=(64, 128, 128)")
    else:
        sides = tuple(chunks)
        if len(sides) != SPATIAL:
            raise _chunks_error(f"chunks={chunks!r} has {len(sides)} sides; pass one int or "
                                "three ints (z, y, x), e.g. chunks=(64, 128, 128)")
    out = tuple(_chunk_side(c, n, chunks, a) for a, (c, n) in enumerate(zip(sides, shape)))
    return None if all(c is None for c in out) else out


def chunk_bounds(n: int, chunk: int) -> tuple[int, ...]:
    """Chunk boundaries ``0, c, 2c, ..., n`` along one axis."""
    return tuple(range(0, n, chunk)) + (n,)


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
