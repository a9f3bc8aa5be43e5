"""Volumes in: paths (zarr v2/v3 arrays and groups, .npy), numpy, dask and zarr
arrays become a (C, Z, Y, X) dask array."""
from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np

from .errors import InputError


def open_volume(source, var: str | None = None):
    """An array from a path (zarr array, zarr group + ``var``, ``.npy`` as a memmap),
    or ``source`` itself when it already is an array."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist; pass the path of a zarr array, "
                         "a zarr group (with var=) or a .npy file")
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    import zarr
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        raise InputError(f"input {str(path)!r} is neither a zarr store nor a .npy file "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if var is None and len(names) == 1:
            var = names[0]
        if var is None or var not in names:
            raise InputError(f"input {str(path)!r} is a zarr group with arrays {names}; "
                             f"pass var= one of them (got {var!r})")
        return node[var]
    return node


def as_dask_volume(volume) -> da.Array:
    """Canonical (C, Z, Y, X) float dask array; raises InputError naming the problem."""
    if isinstance(volume, da.Array):
        arr = volume
    elif hasattr(volume, "shape") and hasattr(volume, "dtype"):
        # numpy, zarr, h5py, memmap, xarray.DataArray (its .data)
        data = getattr(volume, "data", None) if type(volume).__name__ == "DataArray" else volume
        if isinstance(data, da.Array):
            arr = data
        else:
            arr = da.from_array(data, chunks=_natural_chunks(data), asarray=isinstance(data, np.ndarray) or None)
    else:
        raise InputError(f"volume of type {type(volume).__name__} is not an array; pass a numpy, "
                         "dask or zarr array shaped (Z, Y, X) or (C, Z, Y, X)")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise InputError(f"volume has shape {tuple(arr.shape)} ({arr.ndim} dims); volarray needs "
                         "(Z, Y, X) for one channel or (C, Z, Y, X)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"volume has dtype {arr.dtype}; pass floating-point data "
                         "(e.g. volume.astype('float32')) scaled as the model was trained")
    if any(s == 0 for s in arr.shape):
        raise InputError(f"volume has an empty axis: shape {tuple(arr.shape)}")
    return arr


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
