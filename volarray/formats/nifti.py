"""NIfTI scans through nibabel: read lazily, written back with the input's affine.

An uncompressed ``.nii`` is read region by region through nibabel's array proxy (a
memory map: only the bytes of the region are read). A ``.nii.gz`` is one gzip stream,
which cannot be read from the middle without decompressing all that precedes it, so it
is streamed once, slab by slab, into a zarr cache (``cache=``, by default a folder named
after the file's path, size and time under the system's temporary folder, reused while
the file is unchanged), and read from there.

The array keeps the file's voxel order (i, j, k), as nibabel gives it; the affine that
places voxels in the patient is kept in the attributes, and each axis's coordinate is
the voxel index times the voxel size (mm) from the header.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from ..errors import InputError
from ..readers import CheckedReader, lazy_array
from .common import (array_data, lazy_dataarray, require, staging_file, stream_blocks,
                     unused_target)

SUFFIXES = (".nii", ".nii.gz")
DIMS = ("i", "j", "k")
# the header's intent_name (16 bytes) of every file volarray writes: what --overwrite
# may replace, where a file of the user's (a scan, a copy of one) is never replaced
MARK = b"volarray"


def written_by_volarray(path) -> bool:
    """Whether the NIfTI file at ``path`` carries volarray's mark (its header only)."""
    try:
        nib = require("nibabel", "medical")
        return bytes(nib.load(os.fspath(path)).header["intent_name"]).rstrip(b"\0") == MARK
    except Exception:  # not a NIfTI file, unreadable: not volarray's
        return False


class NiftiVolume:
    """The (i, j, k) voxels of an uncompressed NIfTI file, read through nibabel's proxy
    (scaling by scl_slope/scl_inter applied; thread-safe)."""

    def __init__(self, img):
        self.proxy = img.dataobj
        self.path = img.get_filename()
        self.shape = tuple(int(n) for n in img.shape[:3])
        self.extra = (0,) * (len(img.shape) - 3)  # a (X, Y, Z, 1) image's last axis
        self.dtype = np.dtype(self.proxy.dtype) if _unscaled(img) else np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (3 - len(tuple(index)))
        return np.asarray(self.proxy[index + self.extra], dtype=self.dtype)


def _unscaled(img) -> bool:
    slope, inter = img.header.get_slope_inter()
    return slope in (None, 1.0) and inter in (None, 0.0)


def open_nifti(path, *, chunks=None, cache=None):
    """A 3-D NIfTI scan (``.nii`` or ``.nii.gz``) as a lazy ``xarray.DataArray`` named
    ``image`` with dims (i, j, k) in the file's voxel order, coordinates in mm from the
    voxel size, and the affine (``attrs["affine"]``, 4x4) and voxel size kept."""
    nib = require("nibabel", "medical")
    path = os.fspath(path)
    try:
        img = nib.load(path, keep_file_open=False)
    except Exception as e:
        raise InputError(f"{path!r} is not a readable NIfTI file ({e})") from None
    if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise InputError(f"{path!r} holds a {len(img.shape)}-D image {img.shape}; volarray "
                         "reads 3-D scans (split a 4-D series into volumes)")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    coords = {d: np.arange(n) * z for d, n, z in zip(DIMS, img.shape[:3], zooms)}
    attrs = {"source": path, "format": "nifti", "affine": img.affine.tolist(),
             "voxel_size_mm": zooms}
    if path.endswith(".gz"):
        return _cached(img, path, cache, coords, attrs, chunks)
    return lazy_dataarray(NiftiVolume(img), DIMS, coords, attrs, "image", chunks)


def scan_header(volume):
    """The voxel size (mm, in the file's (i, j, k) order) and the axis codes of the
    affine (e.g. ("R", "A", "S")) of a NIfTI scan: a path (only the header is read) or a
    DataArray `open_nifti` made; None for anything else."""
    if isinstance(volume, (str, os.PathLike)):
        if not os.fspath(volume).endswith(SUFFIXES) or not os.path.isfile(volume):
            return None
        nib = require("nibabel", "medical")
        img = nib.load(os.fspath(volume))
        zooms, affine = img.header.get_zooms()[:3], img.affine
    else:
        attrs = getattr(volume, "attrs", None) or {}
        if attrs.get("format") != "nifti" or "voxel_size_mm" not in attrs:
            return None
        nib = require("nibabel", "medical")
        zooms, affine = attrs["voxel_size_mm"], np.asarray(attrs["affine"])
    return {"spacing": tuple(float(z) for z in zooms),
            "axcodes": tuple(nib.aff2axcodes(affine))}


def _cached(img, path, cache, coords, attrs, chunks):
    """A .nii.gz streamed once into a zarr cache, then read lazily from it."""
    import xarray as xr
    import zarr

    nib = require("nibabel", "medical")
    st = os.stat(path)
    identity = {"source": os.path.abspath(path), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns, "shape": list(img.shape[:3]),
                "dtype": str(NiftiVolume(img).dtype)}
    if cache is None:
        key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        cache = os.path.join(tempfile.gettempdir(), "volarray-cache", key + ".zarr")
    cache = os.fspath(cache)
    if _cache_state(cache, identity) != "complete":
        # one open handle for the whole pass: gzip is read forward once
        _stream_to_zarr(NiftiVolume(nib.load(path, keep_file_open=True)), cache, identity)
    arr = zarr.open_array(cache, mode="r")
    return xr.DataArray(lazy_array(CheckedReader(arr), chunks or arr.chunks), dims=DIMS,
                        coords=coords, attrs=dict(attrs, cache=cache), name="image")


CACHE_MARK = "volarray-nifti-cache.json"


def _cache_state(cache: str, identity: dict) -> str:
    """'complete' (a finished cache of this very file), 'stale' (volarray's cache of
    another file or version, or one stopped halfway: replaced) or 'absent'; a folder
    volarray did not make is refused, never emptied."""
    if not os.path.exists(cache):
        return "absent"
    mark = os.path.join(cache, CACHE_MARK)
    if not os.path.isfile(mark):
        if os.path.isdir(cache) and not os.listdir(cache):
            return "absent"
        raise InputError(f"cache={cache!r} exists and is not a volarray NIfTI cache; pass a new "
                         "folder (it is filled with the decompressed scan)", parameter='cache')
    with open(mark) as f:
        saved = json.load(f)
    return "complete" if saved.get("complete") and saved.get("identity") == identity \
        else "stale"


def _stream_to_zarr(volume: NiftiVolume, cache: str, identity: dict) -> None:
    """One sequential pass through the gzip stream, slab by slab along k (the slowest
    axis in the file), into a zarr array; marked complete only at the end."""
    import zarr
    if os.path.exists(os.path.join(cache, CACHE_MARK)):
        shutil.rmtree(cache)  # volarray's own cache, stale or stopped halfway
    os.makedirs(cache, exist_ok=True)
    mark = os.path.join(cache, CACHE_MARK)
    with open(mark, "w") as f:
        json.dump({"identity": identity, "complete": False}, f)
    chunk = tuple(min(n, 128) for n in volume.shape)
    out = zarr.create_array(cache, shape=volume.shape, chunks=chunk, dtype=volume.dtype)
    step = chunk[2]
    for k in range(0, volume.shape[2], step):
        out[:, :, k:k + step] = volume[:, :, k:k + step]
    with open(mark, "w") as f:
        json.dump({"identity": identity, "complete": True}, f)


def write_nifti(array, path, *, like=None, affine=None, overwrite: bool = False) -> str:
    """A (i, j, k) volume, or (channel, i, j, k) scores (written as a 4-D image with the
    channels last, NIfTI's order), as a NIfTI file (``.nii`` or ``.nii.gz``) with the
    affine and header of ``like`` (the scan it was predicted from) or ``affine``.
    Labels keep their integer type (uint8/uint16), scores are float32. Streamed slab by
    slab, never the whole volume in memory."""
    nib = require("nibabel", "medical")
    data = array_data(array)
    path = unused_target(path, overwrite, written_by_volarray)
    if not path.endswith(SUFFIXES):
        raise InputError(f"output {path!r}: a NIfTI file name ends with .nii or .nii.gz")
    if like is not None:
        ref = nib.load(os.fspath(like))
        header, affine = ref.header.copy(), ref.affine
    else:
        header, affine = nib.Nifti1Header(), np.eye(4) if affine is None else np.asarray(affine)
    channels = data.shape[0] if data.ndim == 4 else None
    spatial = tuple(data.shape[-3:])
    dtype = np.dtype(data.dtype) if np.issubdtype(data.dtype, np.integer) else np.dtype("f4")
    header = nib.Nifti1Header.from_header(header)
    header.set_data_shape(spatial + ((channels,) if channels else ()))
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header.set_sform(affine, code=int(header["sform_code"]) or 1)
    header.set_qform(affine, code=int(header["qform_code"]) or 1)
    header.set_intent("none")  # the scan's statistic (a t test's) is not the prediction's
    header["intent_name"] = MARK
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # the scan's display window
    header["descrip"] = b"volarray prediction"
    if channels:  # the fourth axis holds classes, not time points of the scan
        header.set_xyzt_units(xyz=header.get_xyzt_units()[0], t="unknown")
        header["pixdim"][4], header["toffset"] = 1.0, 0.0
    header["vox_offset"] = 352
    stored = header.get_data_dtype()  # the header's byte order
    tmp = staging_file(path)
    try:
        with (gzip.open(tmp, "wb", compresslevel=4) if path.endswith(".gz")
              else open(tmp, "wb")) as f:
            f.write(header.binaryblock)
            f.write(b"\0" * (352 - len(header.binaryblock)))  # no extensions
            for c in range(channels or 1):
                vol = data[c] if channels else data
                for _, block in stream_blocks(vol, axis=2):
                    f.write(np.asarray(block).astype(stored).tobytes(order="F"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
