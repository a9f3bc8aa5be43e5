"""Runs that write zarr: chunk by chunk, resumable, with kept tensors on disk.

The output is a zarr group holding the prediction array(s) and a small array of
completion marks, one per output chunk, each its own zarr chunk. A task writes its
chunk (of every output array), then its mark; a run that died leaves half-written
chunks unmarked, and a resumed run computes exactly the unmarked ones. What may be
written or removed, and what a stopped run leaves, is decided in `outputs`.
"""
from __future__ import annotations

import os
import re

import dask
import numpy as np
from dask.base import tokenize
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from . import outputs
from .cluster import client_of, with_scheduler_file
from .api import make_predictor, predicted, prepared
from .claim import claimed
from .digest import BAD_VOXEL, check_input_unchanged, digests_of, forget_input_chunk, record_task
from .errors import InputError, VolarrayError
from .io import open_volume
from .location import Location, OpenedArrays
from .options import PredictOptions, output_attrs
from .outputs import DONE, HASHES, RunInterrupted
from .scratchfiles import ZarrRegions, task_files


def _zarr():
    import zarr
    return zarr


# "auto" scratch: kept tensors past this go to disk. Writing and reading them back costs
# seconds per GB here, against minutes of recompute per GB of kept input-sized tensors
# (FaultSeg3D: 1.49x one forward keeping 1x the input, 2.27x keeping nothing), and the
# run's memory stays that of its tasks, whatever the volume's size.
SPILL_ABOVE = 256 * 2**20


class ScratchSpace:
    """Where exact mode keeps the tensors passed between stages: on disk in a zarr
    scratch folder beside the output (``mode=True``), in memory (False), or on disk
    when they pass SPILL_ABOVE bytes ("auto"). The folder is made on first
    use and removed by `remove`."""

    def __init__(self, out: Location, mode="auto"):
        if mode not in (True, False, "auto"):
            raise InputError(f"scratch={mode!r} is not True, False or 'auto'",
                             parameter="scratch")
        self.out, self.mode, self.dir, self.count = out, mode, None, 0

    @property
    def may_spill(self) -> bool:
        return self.mode is not False

    def arrays_for(self, plan) -> dict | None:
        """Scratch arrays for the plan's kept tensors, or None to keep them in memory:
        "auto" spills them past SPILL_ABOVE bytes."""
        if not (self.mode is True or (self.mode == "auto" and plan.kept_bytes > SPILL_ABOVE)):
            return None
        zarr = _zarr()
        if self.dir is None:
            self.dir = outputs.make_scratch(self.out)
        self.count += 1
        paths = {}
        for stage in plan.stages[:-1]:
            node = plan.graph.nodes[stage.output]
            loc = self.dir.child(f"plan{self.count}").child(stage.output)
            dtype = getattr(plan, "kept_dtype", "float32")  # the compute dtype's
            if loc.is_local:  # a file per task (`volarray.scratchfiles`): fast halo reads
                paths[stage.output] = task_files(loc.path, stage.bounds, node.channels, dtype)
                continue
            zarr.create_array(**loc.zarr_kwargs(), shape=(node.channels,) + node.shape,
                              dtype=dtype,
                              chunks=(node.channels,) + stage.chunk_shape,
                              compressors=None)
            paths[stage.output] = ZarrRegions(OpenedArrays(loc))
        return paths

    def remove(self):
        if self.dir is not None:
            from .worker import SCRATCH_WRITER
            SCRATCH_WRITER.flush()  # writes still in flight after a stopped run
        outputs.remove_scratch(self.dir)


def write_block(out: OpenedArrays, names, index, *blocks) -> int:
    """One output chunk of every output array, then its completion mark."""
    for name, block in zip(names, blocks):
        array = out[name]
        spatial = array.chunks[-3:]
        lo = [i * c for i, c in zip(index, spatial)]
        lead = (slice(None),) * (block.ndim - 3)
        array[lead + tuple(slice(a, a + n) for a, n in zip(lo, block.shape[-3:]))] = block
    out[DONE][tuple(index)] = 1  # only after the data: marks never lie
    return 1


def _count(*marks) -> int:
    return sum(marks)


@with_scheduler_file
def predict_to_zarr(model, volume, store, *, name: str = "prediction", var: str | None = None,
                    overwrite: bool = False, resume: bool = False, scheduler=None,
                    scratch="auto", predictor=None, storage_options: dict | None = None,
                    scheduler_file=None, **options):
    """Run ``predict`` and write the result into the zarr group ``store`` as array
    ``name`` (zarr v3, dims channel, z, y, x; labels z, y, x). Returns the zarr array,
    or for ``ensemble=`` the pair of arrays ``<name>_mean`` and ``<name>_std``.

    ``options`` are `predict`'s (method, roi_size, tta, output, threshold, ensemble, ...).
    ``volume``: an array, or a path or URL (zarr array, zarr group with ``var``, .npy).
    ``store`` and ``volume`` may be URLs (``s3://bucket/out.zarr``, ``gs://``,
    ``file://``, ``memory://``) read and written through fsspec, with
    ``storage_options`` (credentials, ``endpoint_url``...) for both; resume marks and
    scratch live beside the output there too.
    An existing ``store`` is an error unless ``overwrite=True`` (replace it, only if
    volarray wrote it) or ``resume=True`` (finish a stopped run: only unmarked chunks
    are computed). The output can never be the input or a folder holding it.
    ``scratch``: keep the tensors passed between stages in a temporary zarr store
    beside the output (True), in memory (False), or on disk when they pass 256 MB
    ("auto"); it is removed however the run ends. Unless ``scratch=False``,
    the default keep budget is the input's bytes even for models with norm barriers
    (`predict` keeps at most an eighth of RAM across a barrier).
    ``scheduler``: any dask scheduler ("threads", "sync", a distributed Client);
    ``scheduler_file``: instead, the file ``dask scheduler --scheduler-file F`` wrote (a
    client of that cluster is opened for the run and closed after it).
    A run stopped by an error, Ctrl-C or SIGTERM keeps its finished chunks and says
    how to resume; Ctrl-C and SIGTERM raise `RunInterrupted`.
    ``predictor`` (for pipelines such as `volarray.nnunet`'s): a callable that takes the
    validated input, a (C, Z, Y, X) dask array (integer volumes included), and returns
    the lazy result in place of ``predict(model, ...)``; its ``token`` (settings that
    change the numbers) joins the run's identity and its ``attrs`` the arrays'
    attributes. ``model`` then stands for the weights; ``options`` must be empty.
    """
    options = check_options(predictor, options)
    check_name(name)
    src = open_volume(volume, var, storage_options)
    inputs = (outputs.input_paths(volume, storage_options)
              + outputs.input_paths(src, storage_options))
    out = outputs.check_place(store, inputs, overwrite=overwrite, resume=resume,
                              storage_options=storage_options)
    with claimed(out):  # one run per output: a second one is refused until this one ends
        action = outputs.check_action(out, str(store), overwrite=overwrite, resume=resume)
        # validates before anything is traced or written
        # the volume canonical and its normalization resolved once (recorded in the attributes)
        source, options = prepared(src, options, integers=predictor is not None)
        if action != "create":
            outputs.remove_leftovers(out)  # of this output's runs killed with SIGKILL
        run = _Run(out, model, source, options, predictor, scheduler)
        space = ScratchSpace(out, scratch)
        try:
            result = (predictor(source) if predictor is not None
                      else predicted(make_predictor(model, options, space), source, options))
            run.arrays = _named_arrays(result, name)
            run.axes = spatial_axes(src, run.arrays)
            run.run_id = _run_id(model, volume, var, source, run.arrays, options,
                                 getattr(predictor, "token", None), storage_options)
            getattr(run, action)()
        finally:
            space.remove()
        group = out.open_group("r")
    zarr_arrays = tuple(group[n] for n in run.arrays)
    return zarr_arrays if len(zarr_arrays) > 1 else zarr_arrays[0]


class _Run:
    """One predict_to_zarr run once its arrays are known: ``create``, ``resume`` or
    ``replace`` its output."""

    def __init__(self, out: Location, model, source, options, predictor, scheduler):
        self.out, self.model, self.source, self.options = out, model, source, options
        self.predictor, self.scheduler = predictor, scheduler
        self.arrays, self.axes, self.run_id = {}, {}, {}

    def _creator(self, where: Location):
        def create(made: list):
            return _create_output(where, self.run_id, self.arrays, self.model, self.options,
                                  self.predictor, self.axes, made=made)
        return create

    def create(self):
        # the input's digests: tasks of the same graph, recorded before any mark
        self._forgetting_bad_voxels(lambda: _write(
            self.out, None, self.arrays, self.scheduler, self._creator(self.out),
            digests=self.source))

    def resume(self):
        group = _open_for_resume(self.out, self.run_id, self.arrays)
        if not group[DONE][...].all():  # a finished output reads nothing: nothing to mix
            check_input_unchanged(self.out, group, self.source, self.scheduler)
        self._forgetting_bad_voxels(
            lambda: _write(self.out, group, self.arrays, self.scheduler))

    def replace(self):
        """The old output stays whole until the new one is complete."""
        outputs.check_replaceable(self.out, list(self.arrays) + [
            d for d, v in self.axes.items() if v is not None])
        staging = outputs.make_staging(self.out)
        _write(staging, None, self.arrays, self.scheduler, self._creator(staging),
               replacing=self.out, digests=self.source)
        outputs.swap_in(staging, self.out)

    def _forgetting_bad_voxels(self, write):
        """A run stopped by a NaN or Inf in the input: the finished chunks never read it,
        so the input chunk that holds it is left out of the resume check (the user fixes
        the voxel in place and resumes)."""
        try:
            write()
        except InputError as e:
            found = BAD_VOXEL.search(str(e))
            if found:
                forget_input_chunk(self.out, self.source,
                                   tuple(int(v) for v in found.group(1).split(",")))
            raise


def check_options(predictor, options: dict) -> PredictOptions:
    """``predict``'s options, built, or a predictor with a token (what identifies its
    run) and the default options."""
    if predictor is not None and not hasattr(predictor, "token"):
        raise InputError(f"predictor={type(predictor).__name__} has no token (the settings "
                         "that change its numbers), so a resumed run could not tell it from "
                         "another; pass predict's options (method=, roi_size=, ...) instead",
                         parameter="predictor")
    if predictor is not None and options:
        raise InputError(f"predict_to_zarr got predict options {sorted(options)} and a "
                         "predictor; the predictor sets its own", parameter="predictor")
    return PredictOptions.given(options, "predict_to_zarr")


def check_name(name) -> None:
    """An array name that is one plain entry of the output group."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) \
            or name in (DONE, HASHES):
        raise InputError(f"name={name!r} is not an array name for the output: use letters, "
                         f"digits, '_', '-' or '.', not starting with '.' and not {DONE!r} "
                         f"or {HASHES!r}", parameter='name')


def _named_arrays(result, name: str) -> dict:
    if isinstance(result, tuple):  # ensemble
        return {f"{name}_mean": result[0], f"{name}_std": result[1]}
    return {name: result}


def input_sample(arr) -> str:
    """A token of the input's shape, type and three small boxes of its values (a corner,
    the centre, the far corner): a file replaced at the same path is not the same input,
    while a voxel fixed in place elsewhere (a NaN found mid-run) still is."""
    boxes = []
    for where in ("lo", "mid", "hi"):
        index = [slice(None)]
        for n in arr.shape[1:]:
            side = min(n, 16)
            start = {"lo": 0, "mid": (n - side) // 2, "hi": n - side}[where]
            index.append(slice(start, start + side))
        boxes.append(arr[tuple(index)])
    # callbacks=[]: a small read of the input is not the run, so no progress bar shows it
    values = dask.compute(*boxes, scheduler="sync", callbacks=[])
    return tokenize(arr.shape, str(arr.dtype), [np.asarray(v) for v in values])


def _run_id(model, volume, var, source_array, arrays: dict, options: PredictOptions,
            predictor_token=None, storage_options=None) -> dict:
    """What makes a run the same run, part by part: the model's weights, the input (its
    path when it has one, so that fixing a bad voxel in place keeps finished chunks
    valid), the options that change the numbers, and the output's arrays and chunking
    (the memory limit and the device only choose how it runs)."""
    from .window import weights_token
    source = ((Location.of(str(volume), storage_options).url, var, input_sample(source_array))
              if isinstance(volume, (str, os.PathLike)) else source_array.name)
    given = options.as_dict()  # an option passed at its default is the same run
    ignored = {"memory_limit", "device", "chunks"} | ({"seed"} if given["ensemble"] is None
                                                     else set())  # seeds draw ensembles only
    if given["mask"] is None:  # no mask: the same run as before masks existed
        ignored |= {"mask", "mask_fill"}
    changes = sorted((k, getattr(v, "__qualname__", repr(v))) for k, v in given.items()
                     if k not in ignored)
    return {"model weights": tokenize(weights_token(model)), "input": tokenize(source),
            "options": tokenize(changes) if predictor_token is None
            else tokenize(changes, predictor_token),
            "arrays and chunks": tokenize([(n, a.shape, a.chunks, str(a.dtype))
                                           for n, a in arrays.items()])}


def _create_output(out: Location, run_id: dict, arrays: dict, model, options: PredictOptions,
                   predictor=None, axes=None, made: list | None = None):
    """A new output group; its volarray mark comes first, so that a run stopped while
    creating it leaves a store volarray recognises (and may remove). ``made`` gets True
    once the group is this run's (the input's digests are recorded by the run's graph)."""
    group = out.open_group("w-")
    if made is not None:
        made.append(True)
    group.attrs[outputs.MARKER] = {"run": run_id, "arrays": list(arrays),
                                   "coordinates": [d for d, v in (axes or {}).items()
                                                   if v is not None],
                                   "version": _version()}
    _write_coordinates(group, axes or {})
    first = next(iter(arrays.values()))
    group.create_array(DONE, shape=first.numblocks[-3:], chunks=(1, 1, 1), dtype="u1",
                       fill_value=0, dimension_names=("z_chunk", "y_chunk", "x_chunk"))
    for n, a in arrays.items():
        spatial_dims = tuple(axes) if axes else ("z", "y", "x")
        group.create_array(n, shape=a.shape, chunks=tuple(c[0] for c in a.chunks),
                           dtype=a.dtype, dimension_names=(
                               spatial_dims if a.ndim == 3 else ("channel",) + spatial_dims),
                           attributes=output_attrs(model, options, predictor))
    return group


def spatial_axes(src, arrays: dict) -> dict:
    """The input's spatial dims and their coordinates (a field format's inline,
    crossline and sample numbers; a scan's mm), for an output of the same spatial shape:
    the output group gets them as its dimension names and coordinate arrays."""
    if type(src).__name__ != "DataArray" or src.ndim not in (3, 4):
        return {}
    dims = src.dims[-3:]
    if any(a.shape[-3:] != tuple(src.shape[-3:]) for a in arrays.values()) or \
            set(dims) & (set(arrays) | {DONE, HASHES}):
        return {}
    return {d: (np.asarray(src[d].values) if d in src.coords else None) for d in dims}


def _write_coordinates(group, axes: dict) -> None:
    for dim, values in axes.items():
        if values is not None:
            group.create_array(dim, data=values, dimension_names=(dim,))


def _open_for_resume(out: Location, run_id: dict, arrays: dict):
    group = out.open_group("r+")
    marker = outputs.read_marker(out) or {}
    before = marker.get("run")
    differs = [part for part, token in run_id.items()
               if not isinstance(before, dict) or before.get(part) != token]
    if differs or any(n not in group for n in arrays):
        raise InputError(f"output {out.url!r} was written by a run with other settings (its "
                         f"{', '.join(differs or ['array names'])} "
                         f"{'differs' if differs == ['input'] else 'differ'})"
                         f"{_what_differs(group, arrays) if 'arrays and chunks' in differs else ''}"
                         "; its chunks cannot be reused otherwise, and overwrite=True would "
                         "replace them")
    return group


def _what_differs(group, arrays: dict) -> str:
    """Which of the arrays' names, shapes, types and chunks differ from the stored ones."""
    missing = [n for n in arrays if n not in set(group.array_keys())]
    if missing:
        return f"; it holds no array {missing[0]!r}"
    for n, a in arrays.items():
        was, now = group[n], tuple(c[0] for c in a.chunks)
        if tuple(was.shape) != tuple(a.shape):
            return (f"; the first run's {n!r} has shape {tuple(was.shape)}, this one "
                    f"{tuple(a.shape)} (another model or output)")
        if np.dtype(was.dtype) != np.dtype(a.dtype):
            return (f"; the first run's {n!r} is {was.dtype}, this one {a.dtype} (another "
                    "output or output_dtype)")
        if tuple(was.chunks) != now:
            return (f"; the first run wrote chunks of {tuple(was.chunks[-3:])}, this one "
                    f"{now[-3:]}: pass chunks={tuple(was.chunks[-3:])} as it did")
    return ""


def _write(out: Location, group, arrays: dict, scheduler, create=None,
           replacing: Location | None = None, digests=None):
    """Create the output (``create()``, for a new one) and write every unmarked chunk,
    recording the digests of the input ``digests`` (a dask array) first when given.
    However the run stops, finished chunks stay, except in a store that replaces
    another (``replacing``): that one is removed and the old output left as it was."""
    made = []  # only a store this run created may be removed by it
    try:
        with outputs.sigterm_stops_run():
            if group is None:
                group = create(made)
            done = group[DONE][...]
            todo = [tuple(int(i) for i in idx) for idx in np.argwhere(done == 0)]
            written = compute_stoppable(_write_graph(out, arrays, todo, digests), scheduler)
        if written != len(todo):
            raise RuntimeError(f"volarray wrote {written} of {len(todo)} chunks")
    except BaseException as e:
        where = _after_stop(out, bool(made), replacing)
        if isinstance(e, KeyboardInterrupt):
            sig, code = outputs.signal_name(e)
            raise RunInterrupted(f"stopped by {sig}: {where}", code) from None
        if isinstance(e, VolarrayError):
            raise type(e)(f"{e}. {where[0].upper()}{where[1:]}",
                          parameter=getattr(e, "parameter", None)) from None
        raise


def _after_stop(out: Location, fresh: bool, replacing: Location | None) -> str:
    """Tidy a stopped run's output by the rules of `outputs`; say what is left.
    ``fresh``: this run created ``out`` (nothing else is ever removed)."""
    if replacing is not None:
        outputs.remove_output(out, missing_ok=True)
        return (f"the existing output {replacing.url!r} was left as it was; run again with "
                "overwrite=True (--overwrite) to replace it")
    finished, total = outputs.chunk_counts(out)
    if fresh and not finished:
        outputs.remove_output(out, missing_ok=True)  # it holds nothing: as if never started
        return f"nothing was written to {out.url!r}"
    return (f"{finished} of {total} chunks are finished and kept in {out.url!r}; run again "
            "with the same arguments and resume=True (--resume) to compute the rest")


def _write_graph(out: Location, arrays: dict, todo, digests=None) -> Delayed:
    """One task per unmarked chunk, writing it in every output array, then its mark;
    with ``digests`` (the input, a dask array), one task per input chunk hashing it and
    one recording the hashes, which every write waits for (it is done long before the
    first chunk is computed), so that no mark exists without them. The reads, the
    model's tasks and the writes are separate tasks of this one graph: the scheduler
    overlaps them."""
    names = list(arrays)
    first = arrays[names[0]]
    # every array is written in the same spatial chunks
    ys = [a.rechunk(a.chunks[:-3] + first.chunks[-3:]) for a in arrays.values()]
    wname = f"volarray-write-{tokenize(out.url, [y.name for y in ys])}"
    lead = [(0,) * (y.ndim - 3) for y in ys]
    dsk, deps = {}, list(ys)
    if digests is not None:
        hashed = digests_of(digests)
        record = f"volarray-record-hashes-{tokenize(out.url, hashed.name)}"
        dsk[record] = (record_task, out, digests.numblocks,
                       list(flatten(hashed.__dask_keys__())))
        deps.append(hashed)
    arrays_out = OpenedArrays(out)  # opened once per run and process, not per chunk
    dsk.update({(wname, i): (write_block, arrays_out, names,
                             idx if digests is None else (_after, idx, record)) +
                tuple((y.name,) + ld + idx for y, ld in zip(ys, lead))
                for i, idx in enumerate(todo)})
    dsk[wname] = (_count,) + tuple((wname, i) for i in range(len(todo)))
    return Delayed(wname, HighLevelGraph.from_collections(wname, dsk, dependencies=deps))


def _after(value, *_):
    """``value``, once the tasks given after it have run (a dependency, not an input)."""
    return value


def compute_stoppable(collection, scheduler):
    """``collection.compute(scheduler=...)``, where stopping (an error, Ctrl-C) also
    stops the tasks in flight before returning: a distributed run is cancelled, and an
    in-process thread pool is drained, so nothing writes after the caller cleans up."""
    client = client_of(scheduler)
    if client is not None:
        future = client.compute(collection)
        try:
            return future.result()
        except BaseException:
            client.cancel(future)
            raise
    name = scheduler or dask.config.get("scheduler", None) or "threads"
    if name not in ("threads", "threading"):
        return collection.compute(scheduler=scheduler)
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        return collection.compute(scheduler="threads", pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _version() -> str:
    from .version import __version__
    return __version__
