"""Worker-side code: what runs inside the tasks of exact mode's graph.

`ModelRunner` is the graph's model key (the traced module, its weights and the tile
programs, sent to each worker once); the task functions assemble a tile's sources from
neighbouring chunks (or scratch), run its fused ops and return or write the result.
"""
from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np
import torch
import torch.fx as fx
from dask.sizeof import sizeof

from .errors import TraceError
from .devices import array_module, check_finite, model_on, storage_dtype, to_device
from .geometry import Box, Interval
from .heap import (heap_policy, huge_pages_off, release_freed_memory, use_mapped_tensors,
                   worth_huge_pages)
from .ops.base import resolve
from .ops.reduce import stats_chunk, stats_combine, stats_value
from .packed import packed, region
from .costing import reductions
from .planner import Plan
from .runners import first_device, on_task_device, stage_rows


class OnDevice:
    """A model shipped once per worker, moved to its device on first use; the
    device copy, lock and caches are left out when pickled."""

    _transient = ("_lock", "_on_device")
    cast_to = None  # the dtype the device copy's weights are cast to (half precision)

    def _init_cache(self):
        self._lock = threading.Lock()
        self._on_device = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in self._transient:
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def on_device(self, module: torch.nn.Module) -> torch.nn.Module:
        if self._on_device is None:
            with self._lock:
                if self._on_device is None:  # a copy: .to() would move the caller's model
                    self._on_device = model_on(module, self.device, self.cast_to)
        return self._on_device


class ModelRunner(OnDevice):
    """Worker-side state: the traced model on its device, the stage programs and
    the whole-volume (global) nodes.

    Pickled, the traced module travels as bytes (cloudpickle's, so that modules
    defined in a notebook travel by value), unpickled on first use: distributed's
    serializer never meets the GraphModule itself (its generic torch serializer
    cannot pickle fx's generated class, and logs an ERROR before falling back), and a
    scheduler that only passes the model key on never rebuilds it."""

    _transient = OnDevice._transient + ("_values", "_gm", "_nodes")

    def __init__(self, plan: Plan, device: str, seed: int = 0, autocast=None):
        self.seed = seed  # the sample drawn by stochastic layers (PositionalDropout)
        # a half-precision plan (compute_dtype float16 / bfloat16, which ``autocast``
        # names too) runs in that dtype throughout: the model's weights cast once per
        # device (`OnDevice.on_device`), tiles and kept tensors in it; no per-op casts
        self.dtype = storage_dtype(plan.compute_dtype, plan.graph.dtype)
        if autocast is not None and autocast != self.dtype:
            raise ValueError(f"volarray internal error: autocast={autocast} for a plan "
                             f"computing in {plan.compute_dtype}")
        self.cast_to = self.dtype if self.dtype != plan.graph.dtype else None
        self._gm, self.gm_bytes = plan.graph.gm, None
        self.node_names = [n.name for n in self._gm.graph.nodes]
        self.programs = [s.program for s in plan.stages]
        self.barriers = [b.program for b in plan.barriers]
        # rows per slab of a task's sweep; None: each layer over the whole region
        self.slabs = [stage_rows(plan, s) for s in plan.stages]
        self.barrier_slabs = [stage_rows(plan, b) for b in plan.barriers]
        self.tf32 = plan.compute_dtype == "tf32"  # else TF32 off in tasks (exact float32)
        self.kept_dtype = plan.kept_dtype  # kept tensors between stages, as stored
        self.globals = plan.graph.globals or {}
        self.reductions = reductions(plan.graph)  # a barrier's index is its position
        self.device = device
        self.input_name = plan.graph.input
        self.huge_pages = worth_huge_pages(plan.planned_macs)  # a short run keeps them off
        heap_policy()  # a bad VOLARRAY_HEAP is refused here, before any task runs
        self._init_cache()

    def _init_cache(self):
        super()._init_cache()
        self._values = {}  # evaluated attributes and constants
        self._nodes = None  # the traced graph's nodes by their names as traced

    def __getstate__(self):
        state = super().__getstate__()
        if state["gm_bytes"] is None:
            state["gm_bytes"] = cloudpickle.dumps(self._gm)
        return state

    @property
    def gm(self) -> fx.GraphModule:
        if getattr(self, "_gm", None) is None:
            with self._lock:
                if getattr(self, "_gm", None) is None:
                    self._gm = pickle.loads(self.gm_bytes)
        return self._gm

    @property
    def model(self):
        return self.on_device(self.gm)

    def module(self, target: str):
        return self.model.get_submodule(target)

    def graph_node(self, name: str) -> tuple[fx.Node, dict]:
        """The traced graph's node ``name``, and each node's name as traced. Nodes are
        found by position: a module unpickled (on a worker) is re-traced from its code,
        which names its nodes anew."""
        if self._nodes is None:
            nodes = list(self.model.graph.nodes)
            if len(nodes) != len(self.node_names):
                raise TraceError(f"the traced model has {len(nodes)} nodes on this worker, "
                                 f"{len(self.node_names)} where it was traced; report this "
                                 "model, or pass method='window'", parameter="method")
            self._nodes = dict(zip(self.node_names, nodes))
        return self._nodes[name], {n: k for k, n in self._nodes.items()}

    def attr(self, path: str):
        """A parameter, buffer, or constant computed from them ('@node')."""
        if path in self._values:
            return self._values[path]
        if path.startswith("@"):
            node, name_of = self.graph_node(path[1:])

            def value(a):
                if a.op == "get_attr":
                    return self.attr(a.target)
                return self.attr("@" + name_of[a])
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if node.op == "call_module":
                v = self.module(node.target)(*args, **kwargs)
            elif node.op == "call_method":
                v = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                v = node.target(*args, **kwargs)
        else:
            v = self.model
            for part in path.split("."):
                v = getattr(v, part)
        self._values[path] = v
        return v

    def sweep(self, prog, out_box: Box, rows, sources, global_values, origins=None):
        """Yield (slab, output tile) over ``out_box`` swept in slabs of ``rows`` along z
        (one slab when None), as tensors on the device."""
        ctx = TaskContext(self, global_values)
        # a program that only reads its output (a barrier on a kept tensor) is one slab
        slabs = slab_boxes(out_box, rows if prog.order else None)
        full = prog.requirements(out_box)
        tensors = {n: self.on_device_input(n, a, origins) for n, a in sources.items()}
        yield from prog.sweep(ctx, tensors, full, slabs)

    def on_device_input(self, name: str, a, origins=None) -> torch.Tensor:
        """A source region on the task's device: moved in its own dtype (an int16
        volume crosses as int16), the volume's checked for NaN and Inf there (before a
        half cast could make a large value Inf), then cast to the compute dtype."""
        t = to_device(a, self.device)
        if name == self.input_name:
            check_finite(t, (origins or {}).get(name, (0, 0, 0)))
        return t.to(self.dtype)

    def run(self, stage: int, out_box: Box, sources: dict[str, np.ndarray],
            global_values: dict | None = None, origins: dict | None = None,
            statistics: tuple[int, ...] = ()) -> tuple[np.ndarray, tuple]:
        """One task: the stage's output over ``out_box``, and the partial statistics of
        it of the barriers ``statistics`` names (`costing.Barrier.by_stage`), reduced on
        the device before it leaves.

        Tiles run channels-last (NDHWC), which oneDNN convolves ~1.5x faster than
        NCDHW; kept intermediates stay in that layout between stages, and only the
        model's output is returned C-contiguous.
        """
        prog, gv = self.programs[stage], global_values or {}
        y = None
        with torch.inference_mode():
            for slab, t in self.sweep(prog, out_box, self.slabs[stage], sources, gv,
                                      origins):
                if slab == out_box:
                    y = t
                    break
                if y is None:  # one slab at a time into the task's output
                    y = torch.empty((1, t.shape[1]) + out_box.shape, dtype=t.dtype,
                                    device=t.device, memory_format=torch.channels_last_3d)
                y[(slice(None), slice(None)) + slab.slices(out_box.lo)] = t
            whole = y.float() if statistics else None  # a copy in half precision
            partials = tuple(stats_chunk(whole, self.reductions[i].groups)
                             for i in statistics)
            del whole
            last = stage == len(self.programs) - 1  # the result is float32; kept tensors
            # cast on the device, then one copy to the host per task
            y = y[0].detach().to(stored_dtype(last, self.kept_dtype)).cpu().numpy()
        return (np.ascontiguousarray(y) if last else y), partials

    def stats(self, barrier: int, out_box: Box, sources, global_values,
              origins=None) -> np.ndarray:
        """Partial statistics of a barrier's tensor over one chunk's own region."""
        prog, g = self.barriers[barrier], self.reductions[barrier]
        with torch.inference_mode():
            return stats_combine([stats_chunk(t.float(), g.groups) for _, t in self.sweep(
                prog, out_box, self.barrier_slabs[barrier], sources, global_values, origins)])

    def evaluate(self, name: str, global_values: dict):
        """A whole-volume value computed from others (an SE block's MLP)."""
        g = self.globals[name]
        ctx = TaskContext(self, global_values)
        with torch.inference_mode():
            args, kwargs = resolve((g.args, g.kwargs), ctx)
            return g.call(ctx, *args, **kwargs)


def stored_dtype(last: bool, kept: str) -> torch.dtype:
    """A task's output as returned: the model's result in float32, a kept tensor in
    the plan's kept dtype (float16 in a float16 run: half the bytes)."""
    return torch.float16 if kept == "float16" and not last else torch.float32


def slab_boxes(box: Box, rows) -> list[Box]:
    """``box`` cut along z at the multiples of ``rows`` (itself when ``rows`` is None
    or the box is no thicker)."""
    z = box.axes[0]
    if rows is None or len(z) <= rows:
        return [box]
    cuts = [z.lo] + list(range((z.lo // rows + 1) * rows, z.hi, rows)) + [z.hi]
    return [Box((Interval(a, b),) + box.axes[1:]) for a, b in zip(cuts[:-1], cuts[1:])]


class TaskContext:
    """What ops see while running one task: the model, and the global values."""

    def __init__(self, runner: ModelRunner, global_values: dict):
        self.runner = runner
        self.values = global_values
        self.dtype, self.device, self.seed = runner.dtype, runner.device, runner.seed
        self.attr, self.module = runner.attr, runner.module

    def global_value(self, name):
        v = self.values[name]
        if isinstance(v, torch.Tensor):
            return v.to(self.device)
        return v


def assemble(box_bounds, channels: int, parts, fill=None) -> np.ndarray:
    """The region ``box`` of a chunked array from the chunks that overlap it (arrays
    or `PackedChunk`s); where no chunk covers it (outside the volume), ``fill``."""
    box = Box.from_bounds(*box_bounds)
    if len(parts) == 1 and Box.from_bounds(*parts[0][0]).intersect(box) == box:
        (lo, hi), arr = parts[0]
        return region(arr, box.slices(lo))
    # channels-last, the layout tiles run in, so the tensor needs no second copy
    shape, dtype = box.shape + (channels,), parts[0][1].dtype
    xp = array_module(parts[0][1])  # CuPy chunks are assembled on their GPU
    out = (xp.empty(shape, dtype) if fill is None else xp.full(shape, fill, dtype)).transpose(
        3, 0, 1, 2)
    for (lo, hi), arr in parts:
        inter = box.intersect(Box.from_bounds(lo, hi))
        out[(slice(None),) + inter.slices(box.lo)] = region(arr, inter.slices(lo))
    return out


class PendingWrite:
    """A task's output on its way to its scratch array, written by a background thread
    while the worker computes its next task (write-behind: scratch I/O overlaps
    compute). Readers wait for it; pickled (a distributed transfer, a worker's spill)
    it waits and becomes True, so a token that leaves the process means written."""

    def __init__(self, future):
        self.future = future

    def wait(self) -> bool:
        self.future.result()  # re-raises the write's error in the reader
        return True

    def __reduce__(self):
        return bool, (self.wait(),)


class ScratchWriter:
    """Background writes to scratch arrays, at most ``depth`` in flight (each holds a
    task's output), so that memory stays bounded when the disk is slower than compute."""

    def __init__(self, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(depth, thread_name_prefix="volarray-scratch-writer")
        self.slots = threading.BoundedSemaphore(depth)
        self.pending: set = set()
        self.lock = threading.Lock()

    def submit(self, where, region, y) -> PendingWrite:
        self.slots.acquire()
        try:
            future = self.pool.submit(_write_region, where, region, y)
        except BaseException:
            self.slots.release()
            raise
        with self.lock:
            self.pending.add(future)
        future.add_done_callback(self._done)
        return PendingWrite(future)

    def _done(self, future):
        with self.lock:
            self.pending.discard(future)
        self.slots.release()

    def flush(self):
        """Wait for every write in flight (before a scratch store is removed)."""
        with self.lock:
            pending = list(self.pending)
        for f in pending:
            f.exception()  # waits; errors belong to the readers


SCRATCH_WRITER = ScratchWriter()


def _write_region(where, region, y):
    where.write_region(region, y)


class WithStatistics:
    """A stage task's result (its kept chunk, or its scratch write's token) with the
    partial statistics its output was reduced to, per barrier it computes them for:
    readers of the chunk take ``value`` (`tensor_of`), the barrier's tasks
    ``partials[i]`` (`statistics_of`)."""

    __slots__ = ("value", "partials")

    def __init__(self, value, partials: tuple):
        self.value, self.partials = value, partials

    def __reduce__(self):
        return WithStatistics, (self.value, self.partials)


@sizeof.register(WithStatistics)
def _sizeof_with_statistics(r: WithStatistics) -> int:  # what a distributed worker holds
    return sizeof(r.value) + sum(p.nbytes for p in r.partials)


def tensor_of(chunk):
    """A stage task's chunk (or scratch token), whether or not it carries statistics."""
    return chunk.value if isinstance(chunk, WithStatistics) else chunk


def statistics_of(result: WithStatistics, i: int) -> np.ndarray:
    """Barrier tile task of a barrier a stage computes: its stage task's partials."""
    return result.partials[i]


@dataclass(frozen=True)
class ChunkSource:
    """A tensor's region assembled from the dask chunks that overlap it (the volume's,
    or a kept tensor's held in memory); the task fetches them (``[(bounds, chunk)]``)."""
    node: str
    channels: int

    def read(self, box: Box, fetched) -> np.ndarray | None:
        # a tile lying wholly in a layer's padding reads nothing of it
        return assemble((box.lo, box.hi), self.channels, fetched) if fetched else None


@dataclass(frozen=True)
class ScratchSource:
    """A kept tensor's region read from its scratch (`volarray.scratchfiles`: files per
    task on a file system, a zarr array on an object store); the fetched chunks are only
    completion tokens, waited for."""
    node: str
    where: Any

    def read(self, box: Box, fetched) -> np.ndarray | None:
        if not fetched:
            return None
        for _, token in fetched:
            if isinstance(token, PendingWrite):
                token.wait()
        return self.where.read_box(box)


@dataclass(frozen=True)
class ArraySource:
    """The input's region read straight from the array the volume was made from: the
    task fetches its `readers.VolumeSource` (one key of the graph)."""
    node: str

    def read(self, box: Box, fetched) -> np.ndarray | None:
        return None if box.empty else fetched.read(box)


@dataclass(frozen=True)
class TaskSpec:
    """What one tile or statistics task computes: stage (or barrier) ``index``, its
    output region ``bounds`` ``(lo, hi)``, its ``reads`` (``(source, (lo, hi), chunks)``:
    the region, and the bounds of the chunks fetched for it, None where the source
    fetches no chunks; in the order of the fetched parts), the whole-volume values it reads (``values``,
    in the order of the fetched values), and the scratch array its output goes to."""
    index: int
    bounds: tuple
    reads: tuple
    values: tuple = ()
    write_to: Any = None
    statistics: tuple = ()  # barriers whose partials a stage task computes of its output

    @property
    def box(self) -> Box:
        return Box.from_bounds(*self.bounds)

    def sources(self, parts) -> dict[str, np.ndarray]:
        """Each source's region, read with the parts the task fetched for it."""
        out = {}
        for (source, bounds, chunks), fetched in zip(self.reads, parts):
            if chunks is not None:  # each fetched chunk (or token) with its bounds
                fetched = [(b, tensor_of(c)) for b, c in zip(chunks, fetched)]
            a = source.read(Box.from_bounds(*bounds), fetched)
            if a is not None:
                out[source.node] = a
        return out

    def origins(self) -> dict:
        """Where each source's region starts in its whole tensor (for messages)."""
        return {source.node: tuple(bounds[0]) for source, bounds, _ in self.reads}


# A task whose sources and output are smaller than this leaves its freed blocks to the
# next task rather than trimming the heap (malloc_trim: 0.55 ms a call, more than a
# third of a small task's own work in FaultSSL's 1,032 tasks)
TRIM_AFTER_BYTES = 8 << 20


def trim_after(sources: dict, *more) -> None:
    """Return the heap's free pages to the OS after a task that held ``sources`` and
    ``more`` arrays, where they were large (`TRIM_AFTER_BYTES`)."""
    held = sum(getattr(a, "nbytes", 0) for a in list(sources.values()) + list(more))
    if held >= TRIM_AFTER_BYTES:
        release_freed_memory()


def run_task(runner, spec: TaskSpec, parts, values):
    """A stage's output over ``spec.bounds``: returned (packed, when kept), or written
    to its scratch array (then a completion token)."""
    box = spec.box
    use_mapped_tensors()
    sources, y = {}, None
    try:
        sources = spec.sources(parts)  # read before taking a device slot: I/O overlaps compute
        with huge_pages_off(not runner.huge_pages), on_task_device(runner) as runner:
            y, partials = runner.run(spec.index, box, sources, dict(zip(spec.values, values)),
                                     spec.origins(), spec.statistics)
    finally:
        trim_after(sources, y)  # the task's intermediates, before the next task
    if spec.write_to is None:  # kept tensors wait for their readers compressed
        out = y if spec.index == len(runner.programs) - 1 else packed(y)
    else:  # a completion token; readers wait for it, then go to the scratch store
        out = SCRATCH_WRITER.submit(spec.write_to, (slice(None),) + box.slices(), y)
    return WithStatistics(out, partials) if partials else out


def stats_task(runner, spec: TaskSpec, parts, values):
    """Partial statistics of barrier ``spec.index`` over ``spec.bounds``."""
    use_mapped_tensors()
    sources = {}
    try:
        sources = spec.sources(parts)  # outside the device slot, as in run_task
        with huge_pages_off(not runner.huge_pages), on_task_device(runner) as runner:
            return runner.stats(spec.index, spec.box, sources,
                                dict(zip(spec.values, values)), spec.origins())
    finally:
        trim_after(sources)


def combine_task(*parts):
    return stats_combine(list(parts))


def value_task(runner, name, stats):
    return stats_value(stats, runner.globals[name], runner.dtype)


def eval_task(runner, name, gnames, gvalues):
    return first_device(runner).evaluate(name, dict(zip(gnames, gvalues)))
