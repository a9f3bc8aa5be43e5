"""A kept tensor's scratch on a file system: one ``.npy`` file per task region.

A stage's task writes its output region whole into a file of its own (renamed into
place when complete, so that no reader sees part of one, and no two tasks share a file
or a page of one, on a node's disk or on a cluster's shared file system); a reader
maps the files its region overlaps and copies out just that region. Reading a task's
region plus a halo of a few voxels from zarr chunks of the task's region took 20-55 ms
(the chunks read whole, through zarr's codec pipeline); from these files it takes 2-4
ms, and FaultSeg3D 160^3 at memory_limit=60MB (125 tasks, 430 MB kept) spent most of
its 16.3 s in those reads. Scratch on an object store stays zarr (`ZarrRegions`).

Files hold a region channels-last, (z, y, x, C), as tiles run: a task's output is
written as it lies in memory, and a region read back is handed to the next task as it
is (`devices.to_device` copies a (C, z, y, x) array into that layout otherwise:
InstanceNormUNet 128^3, 160 tasks, spent 2.5 s in those copies).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .geometry import Box, chunk_range


@dataclass(frozen=True)
class TaskFiles:
    """The scratch of one kept tensor of shape (``channels``,) + spatial shape, written
    by the tasks of the grid ``bounds`` (per-axis chunk boundaries) into ``folder``."""

    folder: str
    bounds: tuple
    channels: int
    dtype: str

    def path(self, lo) -> str:
        return os.path.join(self.folder, "_".join(str(int(v)) for v in lo) + ".zyxc.npy")

    def write_region(self, region, y) -> None:
        """Task output ``y`` (C, z, y, x) for ``region`` ((slice(None),) + a task box's
        spatial slices), written channels-last to a temporary name and renamed into
        place."""
        lo = [s.start for s in region[1:]]
        final = self.path(lo)
        part = final[:-4] + f".part-{uuid.uuid4().hex}.npy"  # one per write, any host
        last = np.asarray(y).transpose(1, 2, 3, 0)  # a tile's own memory order: no copy
        np.save(part, np.ascontiguousarray(last, dtype=self.dtype))
        os.replace(part, final)

    def read_box(self, box: Box) -> np.ndarray:
        """The tensor's values over ``box`` (clipped to the volume), from the files of the
        tasks it overlaps: (C, z, y, x), a view of channels-last memory that
        `devices.to_device` takes as it is: one file mapped copy-on-write where the box
        is that file's region, else a fresh array the overlapping files are copied into."""
        box = Box(tuple(iv.clip(b[-1]) for iv, b in zip(box.axes, self.bounds)))
        ranges = [chunk_range(b, iv) for b, iv in zip(self.bounds, box.axes)]
        if all(len(r) == 1 for r in ranges) and all(
                (b[r[0]], b[r[0] + 1]) == (iv.lo, iv.hi)
                for b, r, iv in zip(self.bounds, ranges, box.axes)):
            # one task's whole region, as the next stage's task on the same grid reads
            # it: the file mapped copy-on-write, no copy made here. A fresh array's
            # pages cost more than the copy on a VM that hands freed memory back to its
            # host (16 MB: 4 ms, or 110-180 ms once handed back; InstanceNormUNet
            # 128^3, 160 reads: 2.6 s, 0.9 s mapped). Writable, so `to_device` takes it
            # as it is; a write would change this process's pages, never the file, and
            # a retried task's file replaces this one under a new inode.
            mapped = np.load(self.path(box.lo), mmap_mode="c")
            if mapped.shape != box.shape + (self.channels,):
                raise ValueError(f"scratch file {self.path(box.lo)} holds {mapped.shape}, "
                                 f"not the task region {box.shape + (self.channels,)}")
            return mapped.transpose(3, 0, 1, 2)
        out = np.empty(box.shape + (self.channels,), self.dtype).transpose(3, 0, 1, 2)
        for idx in np.ndindex(*(len(r) for r in ranges)):
            lo = [self.bounds[a][ranges[a][i]] for a, i in enumerate(idx)]
            hi = [self.bounds[a][ranges[a][i] + 1] for a, i in enumerate(idx)]
            part = np.load(self.path(lo), mmap_mode="r").transpose(3, 0, 1, 2)
            inter = box.intersect(Box.from_bounds(lo, hi))
            out[(slice(None),) + inter.slices(box.lo)] = part[(slice(None),) + inter.slices(lo)]
        return out


@dataclass(frozen=True)
class ZarrRegions:
    """A kept tensor's scratch as a zarr array (``where``: a `location.OpenedArrays`, on
    an object store, where files per task would not serve), read and written as
    `TaskFiles` is."""

    where: Any

    def write_region(self, region, y) -> None:
        self.where.array()[region] = y

    def read_box(self, box: Box) -> np.ndarray:
        return self.where.array()[(slice(None),) + box.slices()]


def task_files(folder: str, bounds, channels: int, dtype) -> TaskFiles:
    """A fresh scratch folder for one kept tensor."""
    os.makedirs(folder, exist_ok=True)
    return TaskFiles(folder, tuple(tuple(int(v) for v in b) for b in bounds), int(channels),
                     np.dtype(dtype).str)
