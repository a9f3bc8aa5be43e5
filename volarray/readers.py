"""The arrays tasks read their regions from: a volume's zarr or numpy array (through
`CheckedReader` for zarr, whose unreadable chunks raise one line), a field format's
reader, or either through a pointwise function (an integer cast, a normalization).

A dask array made from one of them (`region_array`) carries it in its own graph: its
top layer, a `SourceLayer`, holds the source its chunks are read from, and
`source_of` gives it back. `predict`'s tasks then read their regions (halo included)
straight from it, and dask holds no input chunks between tasks. An array derived from
it (sliced, padded, rechunked) has another top layer, so it reads through its chunks.
"""
from __future__ import annotations

import os

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from .errors import InputError
from .geometry import Box


class SourceLayer(MaterializedLayer):
    """The chunks of a dask array read from one array-like ``source``."""

    def __init__(self, mapping, source):
        super().__init__(mapping)
        self.source = source


def region_array(source, chunks, name: str) -> da.Array:
    """A dask array called ``name`` over the array-like ``source`` (shape, dtype,
    ``__getitem__`` of slices), in ``chunks``, that carries ``source`` (`source_of`)."""
    chunks = da.core.normalize_chunks(chunks, source.shape, dtype=source.dtype)
    held = "original-" + name  # the source, one key that every chunk task reads
    bounds = [np.cumsum((0,) + c) for c in chunks]
    dsk = {(name,) + idx: (_getitem, held, tuple(slice(int(b[i]), int(b[i + 1]))
                                                 for b, i in zip(bounds, idx)))
           for idx in np.ndindex(*(len(c) for c in chunks))}
    graph = HighLevelGraph({held: MaterializedLayer({held: source}),
                            name: SourceLayer(dsk, source)}, {held: set(), name: {held}})
    return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), source.dtype))


def _getitem(source, index):
    return np.asarray(source[index])


def source_of(arr):
    """The array-like the dask array ``arr`` reads, where ``arr`` is exactly one that
    `region_array` made (not sliced, padded or otherwise derived), else None."""
    layer = arr.__dask_graph__().layers.get(arr.name) if isinstance(arr, da.Array) else None
    return layer.source if isinstance(layer, SourceLayer) else None


def lazy_array(source, chunks) -> da.Array:
    """A dask array over the array-like ``source`` (a field format's reader), whose
    tasks in `predict` read their regions straight from it, as from a zarr array."""
    path = getattr(source, "path", None)
    stamp = (os.stat(path).st_size, os.stat(path).st_mtime_ns) \
        if path is not None and os.path.isfile(path) else None  # a rewritten file differs
    name = "read-" + tokenize(type(source).__name__, path or id(source), stamp, source.shape,
                              str(source.dtype), chunks)
    return region_array(source, chunks, name)


class VolumeSource:
    """A (C, Z, Y, X) view of a (Z, Y, X) or (C, Z, Y, X) array, in native byte order,
    optionally through a pointwise function ``fn`` (float32 out; per channel, so that
    every channel is read): dask chunks come out C-contiguous (`__getitem__`), a task's
    region channels-last (`read`)."""

    def __init__(self, data, fn=None):
        self.data, self.fn = data, fn
        shape = tuple(data.shape)
        self.shape = shape if len(shape) == 4 else (1,) + shape
        self.ndim = 4
        self.dtype = np.dtype(np.float32) if fn is not None else \
            np.dtype(data.dtype).newbyteorder("=")

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (4 - len(tuple(index)))
        if len(self.data.shape) == 3:
            block = np.asarray(self.data[index[1:]])[None]
        else:  # with fn, every channel: fn is per channel
            block = np.asarray(self.data[index if self.fn is None else
                                         (slice(None),) + index[1:]])
        block = block.astype(block.dtype.newbyteorder("="), copy=False)
        return block if self.fn is None else self.fn(block)[index[:1]]

    def read(self, box: Box) -> np.ndarray:
        """The region ``box`` of every channel, laid out channels-last as tiles run (the
        layout of a region assembled from dask chunks, so both give bitwise the same
        result)."""
        a = self[(slice(None),) + box.slices()]
        if a.shape[0] == 1 and a.flags.c_contiguous and a.flags.writeable and \
                not np.may_share_memory(a, self.data):
            # one channel, freshly decoded (never a view of the user's numpy volume,
            # which a tile written in place would change): its (z, y, x) values are
            # laid out channels-last already; the view gets a channels-last stride for
            # C (numpy gives a 1-long axis 0, which made convs answer in NCDHW)
            return a.reshape(a.shape[1:] + (1,)).transpose(3, 0, 1, 2)
        out = np.empty(a.shape[1:] + a.shape[:1], a.dtype).transpose(3, 0, 1, 2)
        out[...] = a
        return out


class CheckedReader:
    """A zarr array whose unreadable chunks (truncated, corrupt) raise one line naming
    the store and the chunk, instead of a codec traceback. A missing chunk still reads
    as the fill value: that is zarr's design (chunks equal to it are not written)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, array.chunks
        self.ndim = len(self.shape)
        path = getattr(array, "path", "") or ""
        root = getattr(getattr(array, "store", None), "root", None)
        self.where = f"{root}/{path}".rstrip("/") if root is not None else repr(array)
        self.dask_name = "zarr-" + tokenize(self.where, self.shape, str(self.dtype), self.chunks)

    def __getitem__(self, index):
        try:
            return self.array[index]
        except Exception as e:
            chunk, lo, e = self._unreadable_chunk(index, e)
            detail = " ".join(str(e).split())[:160]
            raise InputError(f"input {self.where!r}: chunk {chunk} (from voxel {tuple(lo)}) is "
                             f"unreadable ({type(e).__name__}: {detail}); restore or rewrite "
                             "that chunk of the store") from None

    def _unreadable_chunk(self, index, error):
        """Which chunk of a failed read (a region may span several) fails on its own."""
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        spans = []
        for s, n, c in zip(index, self.shape, self.chunks):
            a, b = (s.start or 0, n if s.stop is None else s.stop) if isinstance(s, slice) \
                else (int(s), int(s) + 1)
            spans.append(range(a // c, -(-b // c)))
        for chunk in np.ndindex(*(len(r) for r in spans)):
            chunk = tuple(r[i] for r, i in zip(spans, chunk))
            lo = tuple(i * c for i, c in zip(chunk, self.chunks))
            try:
                self.array[tuple(slice(a, a + c) for a, c in zip(lo, self.chunks))]
            except Exception as e:
                return chunk, lo, e
        lo = tuple(r[0] * c for r, c in zip(spans, self.chunks))
        return tuple(r[0] for r in spans), lo, error
