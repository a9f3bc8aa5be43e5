"""A kept tensor's scratch on a file system: one ``.npy`` file per task region.

A stage's task writes its output region whole into a file of its own (renamed into
place when complete, so that no reader sees part of one, and no two tasks share a file
or a page of one, on a node's disk or on a cluster's shared file system); a reader
maps the files its region overlaps and copies out just that region. Reading a task's
region plus a halo of a few voxels from zarr chunks of the task's region took 20-55 ms
(the chunks read whole, through zarr's codec pipeline); from these files it takes 2-4
ms, and FaultSeg3D 160^3 at memory_limit=60MB (125 tasks, 430 MB kept) spent most of
its 16.3 s in those reads. Scratch on an object store stays zarr (`volarray.store`).

Files hold a region channels-last, (z, y, x, C), as tiles run: a task's output is
written as it lies in memory, and a region read back is handed to the next task as it
is (`devices.to_device` copies a (C, z, y, x) array into that layout otherwise:
InstanceNormUNet 128^3, 160 tasks, spent 2.5 s in those copies).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import numpy as np

from .geometry import Box, Interval, chunk_range


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
        tasks it overlaps: (C, z, y, x), a view of a channels-last array."""
        shape = [b[-1] for b in self.bounds]
        box = Box(tuple(Interval(max(0, iv.lo), max(max(0, iv.lo), min(iv.hi, n)))
                        for iv, n in zip(box.axes, shape)))
        out = np.empty(box.shape + (self.channels,), self.dtype).transpose(3, 0, 1, 2)
        ranges = [chunk_range(b, iv) for b, iv in zip(self.bounds, box.axes)]
        for idx in np.ndindex(*(len(r) for r in ranges)):
            lo = [self.bounds[a][ranges[a][i]] for a, i in enumerate(idx)]
            hi = [self.bounds[a][ranges[a][i] + 1] for a, i in enumerate(idx)]
            part = np.load(self.path(lo), mmap_mode="r").transpose(3, 0, 1, 2)
            src, dst = [slice(None)], [slice(None)]
            for a, iv in enumerate(box.axes):
                first, last = max(iv.lo, lo[a]), min(iv.hi, hi[a])
                src.append(slice(first - lo[a], last - lo[a]))
                dst.append(slice(first - iv.lo, last - iv.lo))
            out[tuple(dst)] = part[tuple(src)]
        return out


def task_files(folder: str, bounds, channels: int, dtype) -> TaskFiles:
    """A fresh scratch folder for one kept tensor."""
    os.makedirs(folder, exist_ok=True)
    return TaskFiles(folder, tuple(tuple(int(v) for v in b) for b in bounds), int(channels),
                     np.dtype(dtype).str)
