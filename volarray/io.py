"""Volumes in: paths (zarr v2/v3 arrays and groups, .npy), numpy, dask and zarr
arrays become a (C, Z, Y, X) dask array."""
from __future__ import annotations

import os
import weakref

import dask.array as da
import numpy as np
import torch
from dask.base import tokenize

from .location import Location
from .errors import InputError


def open_volume(source, var: str | None = None, storage_options: dict | None = None):
    """An array from a path or URL (zarr array, zarr group + ``var``, local ``.npy`` as a
    memmap, a SEG-Y, MDIO, NIfTI or TIFF volume as a lazy DataArray), or ``source``
    itself when it already is an array. ``storage_options`` go to
    fsspec for URLs (``s3://``, ``gs://``, ``memory://``...)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    from .formats import format_of, open_dataarray
    kind = format_of(source) if "://" not in str(source) and os.path.exists(source) else None
    if kind is not None:  # SEG-Y, MDIO, NIfTI, TIFF: a lazy DataArray
        return open_dataarray(source, **({"var": var} if kind == "mdio" else {}))
    loc = Location.of(str(source), storage_options)
    if not loc.refresh().exists():
        raise InputError(f"input {str(source)!r} does not exist; pass the path or URL of a zarr "
                         "array, a zarr group (with var=) or a .npy file")
    if loc.name.endswith(".npy"):
        if not loc.is_local:
            raise InputError(f"input {str(source)!r}: a .npy file is read from a local path "
                             "only; copy it here or convert it to zarr")
        try:
            return np.load(loc.path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise InputError(f"input {str(source)!r} is not a readable .npy file ({e}); it may be "
                             "truncated: write it again") from None
    import zarr
    try:
        node = zarr.open(mode="r", **loc.zarr_kwargs())
    except Exception as e:
        raise InputError(f"input {str(source)!r} is neither a zarr store nor a .npy file "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if var is None and len(names) == 1:
            var = names[0]
        if var is None or var not in names:
            raise InputError(f"input {str(source)!r} is a zarr group with arrays {names}; "
                             f"pass var= one of them (got {var!r})", parameter="var")
        return node[var]
    return node


def as_dask_volume(volume, integers: bool = False) -> da.Array:
    """Canonical (C, Z, Y, X) float dask array; raises InputError naming the problem.
    Integer volumes (uint8 and uint16 CT stacks, int16 scans) are cast to float32 region
    by region; ``integers=True`` keeps them as they are, for a caller that normalizes
    them itself (nnU-Net's pipeline casts to float32 first, as nnU-Net does)."""
    volume = _from_torch(volume)
    if type(volume).__name__ == "DataArray":
        volume = volume.data  # numpy or dask; a field format's reader stays registered
    source = _READERS.get(volume.name) if isinstance(volume, da.Array) else None
    if _is_zarr_array(volume):
        volume = CheckedReader(volume)
    if isinstance(volume, da.Array):
        arr = volume
    elif hasattr(volume, "shape") and hasattr(volume, "dtype"):
        data = volume  # numpy, zarr, h5py, memmap
        arr = da.from_array(data, chunks=_natural_chunks(data),
                            asarray=isinstance(data, np.ndarray) or None,
                            name=getattr(data, "dask_name", None))
    else:
        raise InputError(f"volume of type {type(volume).__name__} is not an array; pass a numpy, "
                         "dask or zarr array shaped (Z, Y, X) or (C, Z, Y, X)")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InputError(f"volume has shape {tuple(arr.shape)} ({arr.ndim} dims); volarray needs "
                         "(Z, Y, X) for one channel or (C, Z, Y, X)")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"volume has dtype {arr.dtype}; pass numbers (floating-point or "
                         "integer data, e.g. volume.astype('float32'))")
    if not arr.dtype.isnative:  # big-endian numbers (SEG-Y conversions): torch needs native
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if any(s == 0 for s in arr.shape):
        raise InputError(f"volume has an empty axis: shape {tuple(arr.shape)}")
    if not isinstance(volume, da.Array) and isinstance(data, (np.ndarray, CheckedReader)):
        _READERS[arr.name] = data
    elif source is not None and arr.shape[1:] == volume.shape[-3:] and \
            arr.numblocks[0] == 1 and arr.dtype == volume.dtype:
        _READERS[arr.name] = source  # the same array, given a channel axis
    if np.issubdtype(arr.dtype, np.integer) and not integers:
        arr = map_volume(arr, to_float32)
    return arr


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


def to_float32(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32)


def map_volume(arr: da.Array, fn) -> da.Array:
    """The pointwise ``fn`` (float32 out) over the (C, Z, Y, X) volume, region by region.
    A volume that tasks read straight from its zarr or numpy array stays so: they read
    their regions through ``fn``."""
    name = "mapped-" + tokenize(arr.name, fn)
    data = _READERS.get(arr.name)
    if data is None:  # fn is per channel: every block holds all channels
        return arr.rechunk({0: -1}).map_blocks(fn, dtype=np.float32, name=name)
    view = MappedSource(data, fn)
    out = da.from_array(view, chunks=arr.chunks, asarray=False, name=name)
    _READERS[out.name] = view
    return out


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


# dask array name -> the zarr or numpy array it reads (alive while the graph holds it):
# tasks read their region (halo included) straight from it, so dask holds no input
# chunks between tasks
_READERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


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


def _from_torch(volume):
    """A torch tensor (on any device, with or without grad) as a numpy array."""
    if not isinstance(volume, torch.Tensor):
        return volume
    t = volume.detach()
    if t.is_meta:
        raise InputError("volume is a tensor on the meta device: it holds no values")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


def _is_zarr_array(obj) -> bool:
    return type(obj).__module__.startswith("zarr") and hasattr(obj, "chunks") and hasattr(
        obj, "store")


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


def check_finite(block: np.ndarray, origin=(0, 0, 0)) -> None:
    """NaN or Inf in the volume would spread through every layer: refuse it, saying
    at which voxel of the whole volume."""
    if np.isfinite(block).all():
        return
    c, z, y, x = (int(i) for i in np.argwhere(~np.isfinite(block))[0])
    value = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}[str(block[c, z, y, x])]
    pos = tuple(int(o) + d for o, d in zip(origin, (z, y, x)))
    raise InputError(f"the volume holds {value} at channel {c}, voxel (z, y, x) = {pos}; fill "
                     "or mask non-finite values (np.nan_to_num) before predicting")


def _natural_chunks(data):
    chunks = getattr(data, "chunks", None)  # zarr arrays carry their own
    if isinstance(chunks, tuple) and len(chunks) == len(data.shape) and all(
            isinstance(c, int) for c in chunks):
        return chunks
    return "auto"


def rechunk_to(arr: da.Array, bounds) -> da.Array:
    """Rechunk the spatial axes of (C, Z, Y, X) to the given boundaries."""
    chunks = ((arr.shape[0],),) + tuple(tuple(int(b) for b in np.diff(bd)) for bd in bounds)
    return arr if arr.chunks == chunks else arr.rechunk(chunks)
