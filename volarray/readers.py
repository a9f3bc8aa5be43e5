"""The arrays tasks read their regions from: a volume's zarr or numpy array (through
`CheckedReader` for zarr, whose unreadable chunks raise one line), a field format's
reader (`lazy_array`), or a view through a pointwise function (`MappedSource`).

A dask array made straight from one of them is recorded here by its name, so that
`predict`'s tasks read their regions (halo included) from the array itself
(`region_reader`), and dask holds no input chunks between tasks.
"""
from __future__ import annotations

import os
import weakref

import dask.array as da
import numpy as np
from dask.base import tokenize

from .errors import InputError


# dask array name -> the zarr or numpy array it reads (alive while the graph holds it):
# tasks read their region (halo included) straight from it, so dask holds no input
# chunks between tasks
_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def remember_reader(name: str, data) -> None:
    """Record that the dask array called ``name`` is exactly ``data``, read whole."""
    _READERS[name] = data


def reader_of(name: str):
    """The array the dask array called ``name`` reads, or None (see `remember_reader`)."""
    return _READERS.get(name)


def lazy_array(source, chunks) -> da.Array:
    """A dask array over the array-like ``source`` (a field format's reader), whose
    tasks in `predict` read their regions straight from it, as from a zarr array."""
    path = getattr(source, "path", None)
    stamp = (os.stat(path).st_size, os.stat(path).st_mtime_ns) \
        if path is not None and os.path.isfile(path) else None  # a rewritten file differs
    name = "read-" + tokenize(type(source).__name__, path or id(source), stamp, source.shape,
                              str(source.dtype), chunks)
    arr = da.from_array(source, chunks=chunks, asarray=False, name=name)
    _READERS[arr.name] = source
    return arr


class MappedSource:
    """A (C, Z, Y, X) float32 view of a (Z, Y, X) or (C, Z, Y, X) array whose regions
    come out through a pointwise function (an integer cast, a normalization)."""

    def __init__(self, data, fn):
        self.data, self.fn = data, fn
        shape = tuple(data.shape)
        self.shape = shape if len(shape) == 4 else (1,) + shape
        self.ndim, self.dtype = 4, np.dtype(np.float32)

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (4 - len(tuple(index)))
        if len(self.data.shape) == 3:
            block = np.asarray(self.data[index[1:]])[None]
        else:  # every channel: fn is per channel
            block = np.asarray(self.data[(slice(None),) + index[1:]])
        return self.fn(block.astype(block.dtype.newbyteorder("="), copy=False))[index[:1]]


def region_reader(arr: da.Array) -> "RegionReader | None":
    """The array ``arr`` reads, where ``arr`` is exactly a volume `as_dask_volume` made
    from it (not sliced, padded or otherwise derived)."""
    data = _READERS.get(arr.name)
    return RegionReader(data) if data is not None else None


class RegionReader:
    """Regions (C, z, y, x) of a (Z, Y, X) or (C, Z, Y, X) zarr or numpy volume, in
    native byte order."""

    def __init__(self, data):
        self.data = data

    def read(self, lo, hi) -> np.ndarray:
        """The region ``[lo, hi)``, laid out channels-last as tiles run (the layout of a
        region assembled from dask chunks, so both give bitwise the same result)."""
        index = tuple(slice(a, b) for a, b in zip(lo, hi))
        if len(self.data.shape) == 3:
            a = np.asarray(self.data[index])[None]
        else:
            a = np.asarray(self.data[(slice(None),) + index])
        out = np.empty(a.shape[1:] + a.shape[:1], a.dtype.newbyteorder("="))
        out = out.transpose(3, 0, 1, 2)
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
