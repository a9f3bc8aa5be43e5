"""Runs that write zarr: chunk by chunk, resumable, with kept tensors on disk.

The output is a zarr group holding the prediction array and a small array of
completion marks, one per output chunk, each its own zarr chunk. A task writes its
chunk, then its mark; a run that died leaves half-written chunks unmarked, and a
resumed run computes exactly the unmarked ones.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from .api import _device, _plan
from .errors import InputError, VolarrayError
from .execute import build_graph
from .geometry import chunk_bounds
from .io import as_dask_volume, open_volume, rechunk_to

DONE = "volarray_done"  # the completion marks, beside the prediction


def _zarr():
    import zarr
    return zarr


def write_block(path: str, name: str, index, block: np.ndarray) -> int:
    zarr = _zarr()
    group = zarr.open_group(path, mode="r+")
    out = group[name]
    lo = [i * c for i, c in zip(index, out.chunks[1:])]
    out[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(lo, block.shape[1:]))] = block
    group[DONE][tuple(index)] = 1  # only after the data: marks never lie
    return 1


def _count(*marks) -> int:
    return sum(marks)


def predict_to_zarr(model, volume, store, *, name: str = "prediction", var: str | None = None,
                    chunks=None, mode: str = "exact", device=None, memory_limit=None,
                    overwrite: bool = False, resume: bool = False, scheduler=None,
                    scratch="auto"):
    """Run ``predict`` and write the result into the zarr group ``store`` as array
    ``name`` (zarr v3, dims channel, z, y, x). Returns the zarr array.

    ``volume``: an array, or a path (zarr array, zarr group with ``var``, .npy).
    An existing ``store`` is an error unless ``overwrite=True`` (replace it) or
    ``resume=True`` (finish a killed run: only unmarked chunks are computed).
    ``scratch``: keep the tensors passed between stages in a temporary zarr store
    beside the output (True), in memory (False), or on disk when they exceed the
    memory limit ("auto"); the scratch store is removed when the run ends or fails.
    ``scheduler``: any dask scheduler ("threads", "sync", a distributed Client).
    """
    zarr = _zarr()
    if overwrite and resume:
        raise InputError("overwrite=True and resume=True contradict each other; pass one")
    src = open_volume(volume, var)
    arr = as_dask_volume(src)  # validates before anything is written
    dev = _device(device)
    plan = _plan(model, arr, chunks, mode, dev, memory_limit)
    plan.validate()
    out_path = Path(store)
    if out_path.exists() and not (overwrite or resume):
        raise InputError(f"output {str(out_path)!r} exists; pass overwrite=True to replace it "
                         "or resume=True to finish an interrupted run into it")
    fresh = not (resume and out_path.exists())
    arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], plan.chunks)])
    use_scratch = scratch is True or (scratch == "auto" and plan.kept_bytes > plan.memory_limit)
    scratch_dir = (Path(tempfile.mkdtemp(prefix=f".{out_path.name}.scratch-",
                                         dir=out_path.resolve().parent))
                   if use_scratch else None)
    try:
        paths = {}
        if scratch_dir is not None:
            for stage in plan.stages[:-1]:
                node = plan.graph.nodes[stage.output]
                p = str(scratch_dir / stage.output)
                zarr.create_array(p, shape=(node.channels,) + node.shape, dtype="f4",
                                  chunks=(node.channels,) + stage.chunk_shape, compressors=None)
                paths[stage.output] = p
        y = build_graph(plan, arr, dev, scratch=paths)
        out_chunks = (y.shape[0],) + plan.output_stage.chunk_shape
        if resume and out_path.exists():
            try:
                group = zarr.open_group(str(out_path), mode="r+")
            except Exception:
                group = None
            if group is None or group.attrs.get("volarray_run") != y.name or name not in group:
                raise InputError(
                    f"output {str(out_path)!r} was not written by this run (another model, "
                    "volume, chunking or array name); pass overwrite=True to replace it")
        else:
            if out_path.exists():
                shutil.rmtree(out_path)
            group = zarr.open_group(str(out_path), mode="w")
            group.create_array(name, shape=y.shape, chunks=out_chunks, dtype="f4",
                               dimension_names=("channel", "z", "y", "x"),
                               attributes={"model": type(model).__name__, "mode": mode,
                                           "volarray_version": _version()})
            group.create_array(DONE, shape=y.numblocks[1:], chunks=(1, 1, 1), dtype="u1",
                               fill_value=0)
            group.attrs["volarray_run"] = y.name
        done = group[DONE][...]
        todo = [tuple(int(i) for i in idx) for idx in np.argwhere(done == 0)]
        wname = f"volarray-write-{y.name}"
        dsk = {(wname, i): (write_block, str(out_path), name, idx, (y.name, 0) + idx)
               for i, idx in enumerate(todo)}
        dsk[wname] = (_count,) + tuple((wname, i) for i in range(len(todo)))
        graph = HighLevelGraph.from_collections(wname, dsk, dependencies=[y])
        written = Delayed(wname, graph).compute(scheduler=scheduler)
        if written != len(todo):
            raise RuntimeError(f"volarray wrote {written} of {len(todo)} chunks")
        return group[name]
    except VolarrayError:
        # bad input found mid-run (NaN): a fresh output would be half-written, remove it;
        # other failures leave it for resume=True
        if fresh and out_path.exists():
            shutil.rmtree(out_path, ignore_errors=True)
        raise
    finally:
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)


def _version() -> str:
    from . import __version__
    return __version__
