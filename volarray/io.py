"""Volumes in: paths (zarr v2/v3 arrays and groups, .npy), numpy, dask and zarr
arrays become a (C, Z, Y, X) dask array."""
from __future__ import annotations

import os

import dask.array as da
import numpy as np
import torch
from dask.base import tokenize

from .errors import InputError
from .location import Location
from .readers import CheckedReader, VolumeSource, region_array, source_of


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
                         "array, a zarr group (with var=) or a .npy file", parameter="volume")
    if loc.name.endswith(".npy"):
        if not loc.is_local:
            raise InputError(f"input {str(source)!r}: a .npy file is read from a local path "
                             "only; copy it here or convert it to zarr", parameter="volume")
        try:
            return np.load(loc.path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise InputError(f"input {str(source)!r} is not a readable .npy file ({e}); it may be "
                             "truncated: write it again", parameter="volume") from None
    import zarr
    try:
        node = zarr.open(mode="r", **loc.zarr_kwargs())
    except Exception as e:
        raise InputError(f"input {str(source)!r} is neither a zarr store nor a .npy file "
                         f"({type(e).__name__}: {e})", parameter="volume") from None
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
    them itself (nnU-Net's pipeline casts to float32 first, as nnU-Net does).

    A numpy or zarr array, or a field format's reader, becomes an array that carries
    its `VolumeSource` (`readers.source_of`): exact mode's tasks read their regions
    straight from it."""
    volume = _from_torch(volume)
    if type(volume).__name__ == "DataArray":
        volume = volume.data  # numpy or dask (a field format's reader in its graph)
    if _is_zarr_array(volume):
        volume = CheckedReader(volume)
    if not (hasattr(volume, "shape") and hasattr(volume, "dtype")):
        raise InputError(f"volume of type {type(volume).__name__} is not an array; pass a numpy, "
                         "dask or zarr array shaped (Z, Y, X) or (C, Z, Y, X)", parameter="volume")
    shape, dtype = tuple(volume.shape), np.dtype(volume.dtype)
    if len(shape) not in (3, 4):
        raise InputError(f"volume has shape {shape} ({len(shape)} dims); volarray needs "
                         "(Z, Y, X) for one channel or (C, Z, Y, X)", parameter="volume")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise InputError(f"volume has dtype {dtype}; pass numbers (floating-point or "
                         "integer data, e.g. volume.astype('float32'))", parameter="volume")
    if any(s == 0 for s in shape):
        raise InputError(f"volume has an empty axis: shape {(1,) * (4 - len(shape)) + shape}",
                         parameter="volume")
    arr = _canonical(volume)
    if np.issubdtype(arr.dtype, np.integer) and not integers:
        arr = map_volume(arr, to_float32)
    return arr


def _canonical(volume) -> da.Array:
    """(C, Z, Y, X) in native byte order; over a `VolumeSource` where ``volume`` is a
    numpy or zarr array or a dask array read from a field format's reader."""
    source = source_of(volume)
    if isinstance(source, VolumeSource):
        return volume  # made here already
    if source is not None:  # a field format's reader
        chunks = ((1,),) * (4 - volume.ndim) + volume.chunks
        return region_array(VolumeSource(source), chunks, "volume-" + tokenize(volume.name))
    if isinstance(volume, (np.ndarray, CheckedReader)):
        chunks = da.core.normalize_chunks(_natural_chunks(volume), volume.shape,
                                          dtype=volume.dtype)
        chunks = ((1,),) * (4 - volume.ndim) + chunks
        name = getattr(volume, "dask_name", None) or "array-" + tokenize(volume, chunks)
        return region_array(VolumeSource(volume), chunks, name)
    arr = volume if isinstance(volume, da.Array) else da.from_array(
        volume, chunks=_natural_chunks(volume))  # h5py and other array-likes
    arr = arr[None] if arr.ndim == 3 else arr
    # big-endian numbers (SEG-Y conversions): torch needs native
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def canonical(volume, integers: bool = False) -> da.Array:
    """``volume`` as `as_dask_volume` makes it: one it already made (a (C, Z, Y, X)
    dask array of native floats, or integers with ``integers``) passes as it is, so
    that a volume is canonicalised once per call however many steps it passes through."""
    kinds = (np.floating, np.integer) if integers else (np.floating,)
    if isinstance(volume, da.Array) and volume.ndim == 4 and volume.dtype.isnative and \
            any(np.issubdtype(volume.dtype, k) for k in kinds) and all(volume.shape) and \
            not _bare_reader(volume):
        return volume
    return as_dask_volume(volume, integers)


def _bare_reader(volume: da.Array) -> bool:
    """Whether ``volume`` reads a field format's reader not yet seen through a
    `VolumeSource` (a 4-D float reader looks canonical but its tasks would not read
    their regions from it)."""
    source = source_of(volume)
    return source is not None and not isinstance(source, VolumeSource)


def to_float32(block: np.ndarray) -> np.ndarray:
    return block.astype(np.float32)


def map_volume(arr: da.Array, fn) -> da.Array:
    """The pointwise ``fn`` (float32 out) over the (C, Z, Y, X) volume, region by region.
    A volume that tasks read straight from its zarr or numpy array stays so: they read
    their regions through ``fn``."""
    name = "mapped-" + tokenize(arr.name, fn)
    source = source_of(arr)
    if source is None:  # fn is per channel: every block holds all channels
        return arr.rechunk({0: -1}).map_blocks(fn, dtype=np.float32, name=name)
    return region_array(VolumeSource(source, fn), arr.chunks, name)


def _from_torch(volume):
    """A torch tensor (on any device, with or without grad) as a numpy array."""
    if not isinstance(volume, torch.Tensor):
        return volume
    t = volume.detach()
    if t.is_meta:
        raise InputError("volume is a tensor on the meta device: it holds no values",
                         parameter="volume")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


def _is_zarr_array(obj) -> bool:
    return type(obj).__module__.startswith("zarr") and hasattr(obj, "chunks") and hasattr(
        obj, "store")


def check_finite(block: np.ndarray, origin=(0, 0, 0)) -> None:
    """NaN or Inf in the volume would spread through every layer: refuse it, saying
    at which voxel of the whole volume."""
    if np.isfinite(block).all():
        return
    c, z, y, x = (int(i) for i in np.argwhere(~np.isfinite(block))[0])
    value = {"nan": "NaN", "inf": "Inf", "-inf": "-Inf"}[str(block[c, z, y, x])]
    pos = tuple(int(o) + d for o, d in zip(origin, (z, y, x)))
    raise InputError(f"the volume holds {value} at channel {c}, voxel (z, y, x) = {pos}; fill "
                     "or mask non-finite values (np.nan_to_num) before predicting",
                     parameter="volume")


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
