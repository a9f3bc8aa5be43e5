"""Micro-CT TIFF stacks through tifffile: a folder of 2-D slices or one multi-page file,
read slice by slice, and written back as a folder of slices.

The stack is (slice, row, column) in the order of the pages, or of the file names
sorted naturally (``slice_2.tif`` before ``slice_10.tif``). A region reads only its
slices (each whole: TIFF strips are rows of a slice).
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile

import numpy as np

from ..errors import InputError
from .common import (array_data, lazy_dataarray, process_umask, require, stream_blocks,
                     unused_folder)

SUFFIXES = (".tif", ".tiff")
DIMS = ("slice", "row", "column")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class TiffStack:
    """Slices of a folder of single-page TIFFs, or the pages of one multi-page TIFF."""

    def __init__(self, path):
        tifffile = require("tifffile", "microct")
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.files = sorted((f for f in glob.glob(os.path.join(self.path, "*"))
                                 if f.lower().endswith(SUFFIXES)), key=_natural)
            if not self.files:
                raise InputError(f"folder {self.path!r} holds no .tif or .tiff slices")
            with tifffile.TiffFile(self.files[0]) as t:
                page = t.pages[0]
                n = len(self.files)
        else:
            self.files = None
            try:
                with tifffile.TiffFile(self.path) as t:
                    page, n = t.pages[0], len(t.pages)
            except Exception as e:
                raise InputError(f"{self.path!r} is not a readable TIFF file ({e})") from None
        if len(page.shape) != 2:
            raise InputError(f"{self.path!r}: slices of shape {page.shape}; volarray reads "
                             "stacks of 2-D grey-level slices")
        self.shape, self.dtype, self.ndim = (n,) + tuple(page.shape), np.dtype(page.dtype), 3
        self.slices_read = 0  # for tests: slices are read as regions need them

    def __getitem__(self, index):
        tifffile = require("tifffile", "microct")
        index = tuple(index) + (slice(None),) * (3 - len(tuple(index)))
        picked = range(*index[0].indices(self.shape[0]))
        rows, cols = (range(*s.indices(n)) for s, n in zip(index[1:], self.shape[1:]))
        out = np.empty((len(picked), len(rows), len(cols)), self.dtype)
        with contextlib.ExitStack() as stack:
            pages = None if self.files is not None else \
                stack.enter_context(tifffile.TiffFile(self.path)).pages
            for i, s in enumerate(picked):
                page = tifffile.imread(self.files[s]) if pages is None else pages[s].asarray()
                if page.shape != self.shape[1:]:
                    raise InputError(f"{self.path!r}: slice {s} has shape {page.shape}, the "
                                     f"first {self.shape[1:]}; every slice of a stack has one "
                                     "shape")
                out[i] = page[index[1:]]
                self.slices_read += 1
        return out


def open_tiff(path, *, chunks=None):
    """A folder of TIFF slices or a multi-page TIFF as a lazy ``xarray.DataArray`` named
    ``image`` with dims (slice, row, column) and the slices' own type (uint8, uint16...;
    `predict` casts to float32 region by region)."""
    stack = TiffStack(path)
    coords = {d: np.arange(n) for d, n in zip(DIMS, stack.shape)}
    attrs = {"source": stack.path, "format": "tiff"}
    chunks = chunks or (max(1, min(stack.shape[0], 64)),) + stack.shape[1:]
    return lazy_dataarray(stack, DIMS, coords, attrs, "image", chunks)


def write_tiff(array, folder, *, overwrite: bool = False, prefix: str = "slice") -> str:
    """A (slice, row, column) volume as a folder of single-page TIFFs, one per slice
    (``slice_00000.tif``...), in the array's type, a few slices at a time."""
    tifffile = require("tifffile", "microct")
    data = array_data(array)
    if data.ndim != 3:
        raise InputError(f"a TIFF stack is written from a (slice, row, column) volume; got "
                         f"shape {tuple(data.shape)} (select one channel)")
    folder = os.fspath(folder).rstrip("/")
    check_folder(folder, overwrite, prefix)
    # written into a sibling folder, moved into place when whole: a stopped write leaves
    # no partial stack where a complete one is expected
    parent = os.path.dirname(os.path.abspath(folder))
    staging = tempfile.mkdtemp(prefix=".volarray-tiff-", dir=parent)
    try:  # a new folder's mode under the umask (mkdtemp's is 0700)
        os.chmod(staging, 0o777 & ~process_umask())
        digits = max(5, len(str(data.shape[0])))
        for lo, block in stream_blocks(data, axis=0):
            for i, page in enumerate(block):
                tifffile.imwrite(os.path.join(staging, f"{prefix}_{lo + i:0{digits}d}.tif"), page)
        if os.path.isdir(folder):
            unused_folder(folder, overwrite, SUFFIXES, prefix)  # empties an earlier stack
            os.rmdir(folder)
        os.replace(staging, folder)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return folder


def check_folder(folder, overwrite: bool, prefix: str = "slice") -> None:
    """Refuse, before anything runs, a stack folder that could not be written: a file, a
    folder of other files, or an earlier stack without ``overwrite``."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"output {folder!r} is a file; a stack is written to a folder")
    if os.path.isdir(folder) and os.listdir(folder):
        unused_folder(folder, overwrite, SUFFIXES, prefix, dry_run=True)
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise InputError(f"output {folder!r}: folder {parent!r} does not exist")
