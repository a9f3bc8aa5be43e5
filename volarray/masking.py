"""Masks: skip the dead parts of a volume (a survey's dead traces, the air around a scan).

``predict(..., mask=...)`` (and `predict_to_zarr`, the accessor, ``--mask``) takes a
boolean (Z, Y, X) array (numpy, dask, zarr, or a zarr or .npy path; in a Dataset's
accessor, a variable's name), "nonzero" (voxels where any input channel is not 0),
"footprint" (a SEG-Y or MDIO survey's live traces: its ``trace_mask``), or None /
False for none. The default, "auto", is the footprint of a SEG-Y or MDIO input that
has dead or missing traces, else no mask. Output chunks wholly outside the mask are
never computed (no model call, no input read) and hold ``mask_fill`` (0 by default:
zero probability, the background label); chunks that touch it are computed as
without a mask, then their voxels outside it set to ``mask_fill``.

``mask=`` of `predict` becomes, once per call, a `Mask`: a lazy boolean (Z, Y, X) dask
array over the volume's spatial shape (`resolve_mask`). Before the result's graph is
built, the mask is reduced with dask to one state per cell of a grid (`Liveness`: dead,
partial, full), one small computation: a dask graph has no conditional edges, so which
tasks are skipped must be known when the graph is made. `masked` then gives every
output chunk wholly outside the mask a task that makes the fill value and depends on
nothing, and masks the chunks that touch it (voxels outside get the fill value). The
tasks the skipped chunks alone needed (tiles of every stage, window predictions, input
reads) are no longer reachable from the result, and dask's graph culling removes them
before anything runs; a barrier's statistics still read every chunk, so that the
normalization is the whole volume's and the result inside the mask is bitwise the
unmasked one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .errors import InputError
from .readers import source_of

KEYWORDS = ("auto", "footprint", "nonzero")
DEAD, PARTIAL, FULL = 0, 1, 2
MASK_HELP = ("pass a boolean (Z, Y, X) array (numpy, dask or zarr), a zarr or .npy path, "
             "'nonzero', 'footprint' (a SEG-Y or MDIO survey's live traces) or None")


def check_mask(mask, mask_fill, labels: bool) -> None:
    """``mask=`` and ``mask_fill=`` as given to `predict`, checked before any volume is
    read (the shape is checked against the volume by `resolve_mask`)."""
    if isinstance(mask, str) and mask in KEYWORDS or mask is None or mask is False \
            or isinstance(mask, (Mask, os.PathLike)):
        pass
    elif mask is True or isinstance(mask, (bool, int, float)):
        raise InputError(f"mask={mask!r} is not a mask; {MASK_HELP}", parameter="mask")
    elif not isinstance(mask, str) and not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
        raise InputError(f"mask of type {type(mask).__name__} is not an array; {MASK_HELP}",
                         parameter="mask")
    if mask_fill is None:
        return
    number = isinstance(mask_fill, (int, float, np.number)) and not isinstance(mask_fill, bool)
    if not number or not np.isfinite(mask_fill):
        raise InputError(f"mask_fill={mask_fill!r} is not a finite number (the value of the "
                         "voxels outside the mask; 0 by default)", parameter="mask_fill")
    if labels and (int(mask_fill) != mask_fill or mask_fill < 0):
        raise InputError(f"mask_fill={mask_fill!r}: labels are filled with a label, a "
                         "non-negative int (0, the background, by default)",
                         parameter="mask_fill")


@dataclass(frozen=True, eq=False)
class Mask:
    """A resolved mask: ``array``, a lazy boolean (Z, Y, X) dask array; ``kind``:
    'array', 'nonzero' or 'footprint'. Its `liveness` per grid is computed once."""

    array: da.Array
    kind: str
    cache: dict = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # the run's identity (resume): what the mask holds
        return f"Mask({self.kind}, {self.array.name})"

    def liveness(self, bounds) -> Liveness:
        """Dead, partial or full, per cell of the grid whose per-axis boundaries are
        ``bounds``; a grid computed before that holds these boundaries serves."""
        want = [set(int(v) for v in b) for b in bounds]
        for got in self.cache.values():
            if all(w <= set(int(v) for v in b) for w, b in zip(want, got.bounds)):
                return got
        key = tokenize([sorted(w) for w in want])
        self.cache[key] = Liveness.of(self.array, [sorted(w) for w in want])
        return self.cache[key]


@dataclass(frozen=True, eq=False)
class Liveness:
    """Per cell of a rectilinear grid over the volume (``bounds``: boundaries per axis),
    whether the mask holds none (DEAD), some (PARTIAL) or all (FULL) of its voxels."""

    bounds: tuple
    states: np.ndarray

    @classmethod
    def of(cls, mask: da.Array, bounds) -> Liveness:
        """One dask reduction: the mask rechunked to the grid, one state per block."""
        bounds = tuple(np.asarray(b, dtype=np.int64) for b in bounds)
        chunks = tuple(tuple(int(c) for c in np.diff(b)) for b in bounds)
        cells = mask.rechunk(chunks).map_blocks(cell_state, dtype=np.uint8,
                                                chunks=tuple((1,) * len(c) for c in chunks))
        return cls(bounds, np.asarray(cells.compute()))

    def state(self, lo, hi) -> int:
        """The state of the box ``[lo, hi)`` (clipped to the volume)."""
        index = []
        for b, a, z in zip(self.bounds, lo, hi):
            a, z = max(int(a), 0), min(int(z), int(b[-1]))
            if z <= a:
                return DEAD
            index.append(slice(np.searchsorted(b, a, "right") - 1, np.searchsorted(b, z, "left")))
        cells = self.states[tuple(index)]
        if (cells == FULL).all():
            return FULL
        return PARTIAL if (cells != DEAD).any() else DEAD

    def count(self, bounds) -> tuple[int, int]:
        """(dead, all) chunks of the grid ``bounds``."""
        states = [self.state(*box) for box in grid_corners(bounds)]
        return sum(s == DEAD for s in states), len(states)


def cell_state(block: np.ndarray) -> np.ndarray:
    state = FULL if block.all() else (PARTIAL if block.any() else DEAD)
    return np.full((1,) * block.ndim, state, np.uint8)


def grid_corners(bounds):
    """``(lo, hi)`` of every chunk of the grid with per-axis boundaries ``bounds``."""
    for idx in np.ndindex(*(len(b) - 1 for b in bounds)):
        yield (tuple(int(b[i]) for b, i in zip(bounds, idx)),
               tuple(int(b[i + 1]) for b, i in zip(bounds, idx)))


def chunk_edges(chunks) -> list[np.ndarray]:
    """Per-axis boundaries of a dask array's chunks."""
    return [np.cumsum((0,) + tuple(c)) for c in chunks]


# -- what mask= becomes ------------------------------------------------------------------

def resolve_mask(mask, volume, arr: da.Array) -> Mask | None:
    """``mask=`` as a `Mask` over ``arr`` (the canonical (C, Z, Y, X) volume made from
    ``volume``, before any normalization), or None for no mask: None, False, 'auto' on
    a volume without a footprint, or a mask that holds every voxel."""
    if mask is None or mask is False or isinstance(mask, Mask):
        return mask or None
    spatial = tuple(arr.shape[1:])
    if isinstance(mask, str) and mask in KEYWORDS:
        if mask == "nonzero":
            return Mask((arr != 0).any(axis=0), "nonzero")
        fp = footprint(volume, arr)
        if fp is None and mask == "footprint":
            raise InputError("mask='footprint' needs a SEG-Y or MDIO survey (its live traces); "
                             f"this volume of type {type(volume).__name__} has none: "
                             f"{MASK_HELP}", parameter="mask")
        found = None if fp is None else Mask(fp, "footprint")
        if found is not None and mask == "auto" and found.liveness(
                [[0, n] for n in spatial]).states.min() == FULL:
            return None  # every trace live: nothing to skip, the graph as without a mask
        return found
    return Mask(mask_array(mask, spatial), "array")


def mask_array(mask, spatial) -> da.Array:
    """A given mask (array, DataArray, zarr or .npy path) as a boolean dask array of the
    volume's spatial shape."""
    if isinstance(mask, (str, os.PathLike)):
        from .io import open_volume
        mask = open_volume(mask)
    if type(mask).__name__ == "DataArray":
        mask = mask.data
    shape, dtype = tuple(mask.shape), np.dtype(mask.dtype)
    if shape != spatial:
        raise InputError(f"mask has shape {shape}; the volume's spatial shape is {spatial} "
                         "(Z, Y, X): pass a mask of that shape", parameter="mask")
    if not (dtype == bool or np.issubdtype(dtype, np.integer)):
        raise InputError(f"mask has dtype {dtype}; pass a boolean mask (or integers, nonzero "
                         "where live), e.g. mask=(labels > 0)", parameter="mask")
    arr = mask if isinstance(mask, da.Array) else da.from_array(
        mask, chunks=getattr(mask, "chunks", "auto") if not isinstance(mask, np.ndarray)
        else "auto")
    return arr if dtype == bool else arr != 0


def footprint(volume, arr: da.Array) -> da.Array | None:
    """The live traces of a SEG-Y or MDIO survey, broadcast along its samples: the
    DataArray's ``trace_mask`` coordinate (over its two lateral dims), or the
    ``footprint`` of the field format's reader ``arr`` reads; None for other volumes."""
    spatial = tuple(arr.shape[1:])
    if type(volume).__name__ == "DataArray" and "trace_mask" in volume.coords:
        dims = volume.dims[-3:]
        fp = volume.coords["trace_mask"]
        if set(fp.dims) <= set(dims) and len(fp.dims) == 2:
            data = fp.transpose(*[d for d in dims if d in fp.dims]).data
            missing = next(i for i, d in enumerate(dims) if d not in fp.dims)
            return broadcast_lateral(data, missing, spatial)
    reader = source_of(arr)
    for _ in range(4):  # a VolumeSource's data, through a normalization's, to the reader
        if reader is None or hasattr(reader, "footprint"):
            break
        reader = getattr(reader, "data", None)
    if not hasattr(reader, "footprint") or tuple(reader.shape) != spatial:
        return None
    return broadcast_lateral(da.from_delayed(dask.delayed(reader.footprint)(),
                                             shape=spatial[:2], dtype=bool), 2, spatial)


def broadcast_lateral(data, axis: int, spatial) -> da.Array:
    """A 2-D boolean plane repeated along ``axis`` to the (Z, Y, X) ``spatial`` shape."""
    data = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    plane = da.expand_dims(data.astype(bool), axis)
    return da.broadcast_to(plane, spatial, chunks=tuple(
        (n,) if a == axis else c for a, (n, c) in enumerate(zip(spatial, plane.chunks))))


# -- the masked result -------------------------------------------------------------------

def masked(y: da.Array, mask: Mask, fill) -> da.Array:
    """``y`` (..., Z, Y, X) with the chunks wholly outside ``mask`` made of ``fill`` (no
    dependency: their tasks are culled) and the voxels outside the mask of the chunks
    that touch it set to ``fill``; chunks wholly inside are ``y``'s own."""
    if tuple(y.shape[-3:]) != tuple(mask.array.shape):
        raise InputError(f"mask= covers the volume's spatial shape {tuple(mask.array.shape)}; "
                         f"this prediction's is {tuple(y.shape[-3:])} (a model that resizes): "
                         "leave mask= out (mask=None)", parameter="mask")
    live = mask.liveness(chunk_edges(y.chunks[-3:]))
    m = mask.array.rechunk(y.chunks[-3:])
    fill = np.asarray(fill).astype(y.dtype)
    name = "volarray-masked-" + tokenize(y.name, m.name, fill)
    edges = chunk_edges(y.chunks)
    dsk = {}
    for idx in np.ndindex(*y.numblocks):
        lo = [int(e[i]) for e, i in zip(edges, idx)]
        hi = [int(e[i + 1]) for e, i in zip(edges, idx)]
        state = live.state(lo[-3:], hi[-3:])
        if state == DEAD:
            dsk[(name,) + idx] = (np.full, tuple(b - a for a, b in zip(lo, hi)), fill, y.dtype)
        elif state == FULL:
            dsk[(name,) + idx] = (y.name,) + idx
        else:
            dsk[(name,) + idx] = (fill_outside, (y.name,) + idx, (m.name,) + idx[-3:], fill)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[y, m])
    return da.Array(cull_graph(graph, dsk), name, y.chunks, meta=y._meta)


def cull_graph(graph: HighLevelGraph, keys) -> HighLevelGraph:
    """``graph`` without the tasks ``keys`` do not need, layer by layer, each layer
    keeping its name and annotations. (dask's own `HighLevelGraph.cull` keeps a whole
    layer when the keys it carries along happen to number as many as the layer's tasks;
    here each layer is asked only for its own keys.)"""
    need, every = set(keys), graph.get_all_external_keys()
    layers = {}
    for name in reversed(toposorted(graph.dependencies)):
        layer = graph.layers[name]
        mine = {k for k in need if k in layer}
        if not mine:
            continue
        layers[name], deps = layer.cull(mine, every)
        for d in deps.values():
            need |= d
    return HighLevelGraph(layers, {n: set(graph.dependencies[n]) & set(layers)
                                   for n in layers})


def toposorted(dependencies: dict) -> list:
    """Layer names, each after the layers it depends on."""
    order, seen = [], set()
    for root in dependencies:
        stack = [(root, iter(dependencies[root]))]
        if root in seen:
            continue
        seen.add(root)
        while stack:
            node, deps = stack[-1]
            nxt = next((d for d in deps if d not in seen and d in dependencies), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(dependencies[nxt])))
    return order


def fill_outside(block: np.ndarray, inside: np.ndarray, fill) -> np.ndarray:
    return np.where(inside, block, fill).astype(block.dtype, copy=False)


def tasks_run(y: da.Array) -> dict[str, int]:
    """Per stage and barrier of an exact run (``stage 2``, ``stats 0``): the tile
    tasks left in ``y``'s graph, which `masked` culled."""
    counts = {}
    for name, layer in y.__dask_graph__().layers.items():
        parts = name.split("-")
        if parts[1] in ("stage", "stats") and parts[0] == "volarray" and \
                not parts[3].startswith("combine"):
            counts[f"{parts[1]} {parts[2]}"] = sum(
                1 for k in layer if isinstance(k, tuple) and len(k) == 5)
    return counts
