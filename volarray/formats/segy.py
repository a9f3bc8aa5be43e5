"""SEG-Y post-stack 3-D surveys through segyio, lazily, and written back with the input's
headers.

The cube keeps the file's own order: an inline-sorted file is (inline, crossline,
sample), a crossline-sorted one (crossline, inline, sample). A region reads only the
traces it covers, a run of consecutive traces per line, from a handle opened for that
read (segyio's handles are not shared between threads).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .common import (array_data, lazy_dataarray, require, staging_file, stream_blocks,
                     unused_target)

SUFFIXES = (".sgy", ".segy")
# volarray's mark in the binary header's unassigned bytes (3301-3500, SEG-Y rev 2; rev 1
# left 3261-3500 unassigned): what --overwrite may replace, never a survey of the user's
MARK, MARK_AT = b"volarray", 3300


def written_by_volarray(path) -> bool:
    """Whether the SEG-Y file at ``path`` carries volarray's mark."""
    try:
        with open(os.fspath(path), "rb") as f:
            f.seek(MARK_AT)
            return f.read(len(MARK)) == MARK
    except OSError:
        return False


class SegyCube:
    """A (slow line, fast line, sample) array view of a sorted 3-D SEG-Y file."""

    def __init__(self, path, iline: int = 189, xline: int = 193):
        segyio = require("segyio", "seismic")
        self.path, self.iline, self.xline = os.fspath(path), iline, xline
        self.trace_of = None  # (slow, fast) -> trace number, -1 where missing
        try:
            with segyio.open(self.path, iline=iline, xline=xline) as f:
                if f.unstructured:
                    raise InputError(f"{self.path!r} is not a sorted 3-D post-stack survey "
                                     "(no inline/crossline geometry in bytes "
                                     f"{iline}/{xline}); pass iline=/xline= the header bytes "
                                     "that hold them")
                if len(f.offsets) != 1:
                    raise InputError(f"{self.path!r} holds {len(f.offsets)} offsets per "
                                     "trace (pre-stack); volarray reads post-stack cubes")
                inline_sorted = f.sorting == segyio.TraceSortingFormat.INLINE_SORTING
                self.ilines, self.xlines = np.array(f.ilines), np.array(f.xlines)
                self.samples = np.array(f.samples, dtype=np.float64)
                self.interval_us = float(segyio.tools.dt(f))
                self.format = int(f.format) if f.format is not None else 0
        except RuntimeError as e:  # segyio's error for files it cannot read
            raise InputError(f"{self.path!r} is not a readable SEG-Y file ({e})") from None
        except ValueError:  # traces missing from the grid: segyio infers no geometry
            inline_sorted = self._irregular_geometry(segyio)
        slow, fast = (self.ilines, self.xlines) if inline_sorted else (self.xlines, self.ilines)
        self.dims = ("inline", "crossline", "sample") if inline_sorted else \
            ("crossline", "inline", "sample")
        self.coords = {self.dims[0]: slow, self.dims[1]: fast}
        self.shape = (len(slow), len(fast), len(self.samples))
        self.dtype, self.ndim = np.dtype(np.float32), 3
        self.traces_read = 0  # for tests: the file is read region by region

    def _irregular_geometry(self, segyio) -> bool:
        """The grid of a sorted survey with missing traces, from every trace's inline
        and crossline header (``trace_of``); whether it is inline-sorted."""
        with segyio.open(self.path, ignore_geometry=True) as f:
            il = np.asarray(f.attributes(self.iline)[:], np.int64)
            xl = np.asarray(f.attributes(self.xline)[:], np.int64)
            self.samples = np.array(f.samples, dtype=np.float64)
            self.interval_us = float(segyio.tools.dt(f))
            self.format = int(f.format) if f.format is not None else 0
        self.ilines, self.xlines = np.unique(il), np.unique(xl)
        i, x = np.searchsorted(self.ilines, il), np.searchsorted(self.xlines, xl)
        inline_sorted = bool(np.all(np.diff(i * len(self.xlines) + x) > 0))
        slow, fast = (i, x) if inline_sorted else (x, i)
        n_fast = len(self.xlines) if inline_sorted else len(self.ilines)
        if not np.all(np.diff(slow * n_fast + fast) > 0):
            raise InputError(f"{self.path!r} is not a sorted 3-D post-stack survey: its "
                             f"traces' inline/crossline numbers (header bytes {self.iline}/"
                             f"{self.xline}) are not in inline or crossline order, or repeat; "
                             "pass iline=/xline= the header bytes that hold them")
        grid = (len(self.ilines), len(self.xlines))
        self.trace_of = np.full(grid if inline_sorted else grid[::-1], -1, np.int64)
        self.trace_of[slow, fast] = np.arange(len(il))
        return inline_sorted

    def footprint(self) -> np.ndarray:
        """The live traces, (slow line, fast line) booleans: present in the file and not
        flagged dead (trace identification code 2, bytes 29-30)."""
        segyio = require("segyio", "seismic")
        with segyio.open(self.path, ignore_geometry=True) as f:
            codes = np.asarray(f.attributes(segyio.TraceField.TraceIdentificationCode)[:])
        if self.trace_of is None:
            return (codes != 2).reshape(self.shape[:2])
        live = self.trace_of >= 0
        live[live] = codes[self.trace_of[live]] != 2
        return live

    def __getitem__(self, index):
        segyio = require("segyio", "seismic")
        a, b, s = (index + (slice(None),) * 3)[:3]
        rows, cols = range(*a.indices(self.shape[0])), range(*b.indices(self.shape[1]))
        if a.step not in (None, 1) or b.step not in (None, 1):
            raise IndexError("SegyCube reads contiguous regions")
        out = np.empty((len(rows), len(cols), len(range(*s.indices(self.shape[2])))),
                       np.float32)
        with segyio.open(self.path, ignore_geometry=True) as f:
            if self.trace_of is not None:
                return self._read_irregular(f, rows, cols, s, out)
            for i, row in enumerate(rows):
                first = row * self.shape[1]
                traces = f.trace.raw[first + cols.start:first + cols.stop]
                out[i] = np.asarray(traces).reshape(len(cols), -1)[:, s]
                self.traces_read += len(cols)
        return out

    def _read_irregular(self, f, rows, cols, s, out):
        """Rows of a survey with missing traces: each row's present traces (consecutive
        in a sorted file) in one read, zeros where a trace is missing."""
        out[...] = 0
        for i, row in enumerate(rows):
            where = self.trace_of[row, cols.start:cols.stop]
            live = where >= 0
            if live.any():
                lo, hi = int(where[live].min()), int(where[live].max()) + 1
                traces = np.asarray(f.trace.raw[lo:hi]).reshape(hi - lo, -1)
                out[i, live] = traces[where[live] - lo][:, s]
                self.traces_read += int(live.sum())
        return out


def open_segy(path, *, iline: int = 189, xline: int = 193, chunks=None):
    """A sorted 3-D post-stack SEG-Y file as a lazy ``xarray.DataArray`` named
    ``amplitude``: dims in the file's order (``inline``, ``crossline``, ``sample`` for
    an inline-sorted file), inline and crossline numbers from the trace headers
    (``iline``/``xline`` header bytes, 189/193 by default), samples in ms (or m) from
    the binary header. Nothing is read until a region is computed. A survey with missing
    traces (an irregular outline) reads zeros there; its ``trace_mask`` coordinate (the
    live traces, over the two lateral dims, as MDIO names it) is what `predict` masks
    by default (``mask="auto"``)."""
    cube = SegyCube(path, iline, xline)
    coords = dict(cube.coords, sample=cube.samples)
    if cube.trace_of is not None:
        coords["trace_mask"] = (cube.dims[:2], cube.footprint())
    attrs = {"source": cube.path, "format": "segy", "sample_interval_us": cube.interval_us,
             "segy_sample_format": cube.format, "iline_byte": iline, "xline_byte": xline}
    return lazy_dataarray(cube, cube.dims, coords, attrs, "amplitude", chunks)


def write_segy(array, path, *, like, overwrite: bool = False, iline: int = 189,
               xline: int = 193) -> str:
    """A (slow, fast, sample) cube (numpy, dask or DataArray of one channel) as a SEG-Y
    file with the text, binary and trace headers of ``like``, the survey it was predicted
    from, in 4-byte IEEE floats: an interpretation package loads it onto the same
    geometry. Written line block by line block, never the whole cube in memory."""
    segyio = require("segyio", "seismic")
    cube = SegyCube(like, iline, xline)
    data = array_data(array)
    if tuple(data.shape) != cube.shape:
        raise InputError(f"the cube to write has shape {tuple(data.shape)}; {cube.path!r} "
                         f"holds {cube.shape} ({', '.join(cube.dims)}): pass one channel of "
                         "a prediction of that survey")
    path = unused_target(path, overwrite, written_by_volarray)
    with segyio.open(cube.path, iline=iline, xline=xline) as src:
        spec = segyio.tools.metadata(src)
        spec.format = 5  # IEEE float
        tmp = staging_file(path)
        try:
            with segyio.create(tmp, spec) as dst:
                for i in range(1 + getattr(spec, "ext_headers", 0)):  # and extended ones
                    dst.text[i] = src.text[i]
                dst.bin = src.bin
                dst.bin.update(format=5)
                per_line = cube.shape[1]
                for lo, block in stream_blocks(data, axis=0):
                    first = lo * per_line
                    for i, line in enumerate(np.asarray(block, np.float32)):
                        for j in range(per_line):
                            dst.header[first + i * per_line + j] = src.header[
                                first + i * per_line + j]
                        dst.trace.raw[first + i * per_line:first + (i + 1) * per_line] = line
            with open(tmp, "r+b") as f:
                f.seek(MARK_AT)
                f.write(MARK)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path
