"""The dask graph: one blockwise layer per stage, barrier reductions as trees,
tasks that assemble their tile from neighbouring chunks and run fused ops.

The model (traced module, weights and tile programs) is a single key of the
graph that every task depends on, so a distributed worker receives it once and
keeps it, instead of deserializing weights inside every task.
"""
from __future__ import annotations

import copy
import threading

import dask
import dask.array as da
import numpy as np
import torch
import torch.fx as fx
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from .geometry import Box, Interval, chunk_range, grid_boxes
from .heap import release_freed_memory
from .io import RegionReader, check_finite
from .ops.base import resolve
from .ops.reduce import stats_chunk, stats_combine, stats_value
from .planner import Plan

COMBINE_FAN_IN = 8  # partial statistics merged per combine task


class OnDevice:
    """A model shipped once per worker, moved to its device on first use; the
    device copy, lock and caches are left out when pickled."""

    _transient = ("_lock", "_on_device")

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
                    self._on_device = (module if self.device == "cpu"
                                       else copy.deepcopy(module).to(self.device))
        return self._on_device


class ModelRunner(OnDevice):
    """Worker-side state: the traced model on its device, the stage programs and
    the whole-volume (global) nodes."""

    _transient = OnDevice._transient + ("_values",)

    def __init__(self, plan: Plan, device: str, seed: int = 0, autocast=None):
        self.seed = seed  # the sample drawn by stochastic layers (PositionalDropout)
        self.autocast = autocast  # torch.float16 / bfloat16: run tiles under autocast
        self.gm = plan.graph.gm
        self.programs = [s.program for s in plan.stages]
        self.barriers = [b.program for b in plan.barriers]
        self.slabs = [s.slab for s in plan.stages]  # rows per slab of a task's sweep
        self.barrier_slabs = [b.slab for b in plan.barriers]
        self.globals = plan.graph.globals or {}
        self.device = device
        self.dtype = plan.graph.dtype
        self.input_name = plan.graph.input
        self._init_cache()

    def _init_cache(self):
        super()._init_cache()
        self._values = {}  # evaluated attributes and constants

    @property
    def model(self):
        return self.on_device(self.gm)

    def module(self, target: str):
        return self.model.get_submodule(target)

    def attr(self, path: str):
        """A parameter, buffer, or constant computed from them ('@node')."""
        if path in self._values:
            return self._values[path]
        if path.startswith("@"):
            node = next(n for n in self.model.graph.nodes if n.name == path[1:])

            def value(a):
                if a.op == "get_attr":
                    return self.attr(a.target)
                return self.attr("@" + a.name)
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

    def sweep(self, prog, out_box: Box, rows, sources, global_values):
        """Yield (slab, output tile) over ``out_box`` swept in slabs of ``rows`` along z
        (one slab when None), as tensors on the device."""
        ctx = TaskContext(self, global_values)
        # a program that only reads its output (a barrier on a kept tensor) is one slab
        slabs = slab_boxes(out_box, rows if prog.order else None)
        full = prog.requirements(out_box)
        tensors = {n: _to_tensor(a, self.dtype, self.device) for n, a in sources.items()}
        if self.autocast is None:
            yield from prog.sweep(ctx, tensors, full, slabs)
            return
        with torch.autocast(self.device.split(":")[0], dtype=self.autocast):
            for slab, t in prog.sweep(ctx, tensors, full, slabs):
                yield slab, t.float()

    def run(self, stage: int, out_box: Box, sources: dict[str, np.ndarray],
            global_values: dict | None = None, origins: dict | None = None) -> np.ndarray:
        """One task: the stage's output over ``out_box``.

        Tiles run channels-last (NDHWC), which oneDNN convolves ~1.5x faster than
        NCDHW; kept intermediates stay in that layout between stages, and only the
        model's output is returned C-contiguous.
        """
        self.check_input(sources, origins)
        prog, gv = self.programs[stage], global_values or {}
        y = None
        with torch.inference_mode():
            for slab, t in self.sweep(prog, out_box, self.slabs[stage], sources, gv):
                if slab == out_box:
                    y = t
                    break
                if y is None:  # one slab at a time into the task's output
                    y = torch.empty((1, t.shape[1]) + out_box.shape, dtype=t.dtype,
                                    device=t.device, memory_format=torch.channels_last_3d)
                y[(slice(None), slice(None)) + slab.slices(out_box.lo)] = t
            y = y[0].detach().to("cpu").numpy()
        return np.ascontiguousarray(y) if stage == len(self.programs) - 1 else y

    def check_input(self, sources, origins=None):
        """Non-finite input would spread through every layer: refuse it, naming the voxel."""
        a = sources.get(self.input_name)
        if a is not None:
            check_finite(a, (origins or {}).get(self.input_name, (0, 0, 0)))

    def stats(self, barrier: int, out_box: Box, sources, global_values,
              origins=None) -> np.ndarray:
        """Partial statistics of a barrier's tensor over one chunk's own region."""
        prog = self.barriers[barrier]
        self.check_input(sources, origins)
        g = [g for g in self.globals.values() if g.kind == "reduce"][barrier]
        with torch.inference_mode():
            return stats_combine([stats_chunk(t, g.groups) for _, t in self.sweep(
                prog, out_box, self.barrier_slabs[barrier], sources, global_values)])

    def evaluate(self, name: str, global_values: dict):
        """A whole-volume value computed from others (an SE block's MLP)."""
        g = self.globals[name]
        ctx = TaskContext(self, global_values)
        with torch.inference_mode():
            args, kwargs = resolve((g.args, g.kwargs), ctx)
            return g.call(ctx, *args, **kwargs)


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


def _to_tensor(a: np.ndarray, dtype, device) -> torch.Tensor:
    """(C, z, y, x) numpy -> (1, C, z, y, x) channels-last tensor, copying only if the
    array is not already laid out channels-last (kept tensors are)."""
    last = a.transpose(1, 2, 3, 0)
    if not (last.flags.c_contiguous and last.flags.writeable):
        last = np.ascontiguousarray(last)
        if not last.flags.writeable:
            last = last.copy()
    # from the (z, y, x, C) view, so that the batch stride is a true channels-last one
    t = torch.from_numpy(last)[None].permute(0, 4, 1, 2, 3)
    return t.to(device=device, dtype=dtype)


def assemble(box_bounds, channels: int, parts, fill=None) -> np.ndarray:
    """The region ``box`` of a chunked array from the chunks that overlap it; where
    no chunk covers it (outside the volume), ``fill``."""
    box = Box.from_bounds(*box_bounds)
    if len(parts) == 1 and Box.from_bounds(*parts[0][0]).intersect(box) == box:
        (lo, hi), arr = parts[0]
        return arr[(slice(None),) + box.slices(lo)]
    # channels-last, the layout tiles run in, so the tensor needs no second copy
    shape, dtype = box.shape + (channels,), parts[0][1].dtype
    out = (np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)).transpose(
        3, 0, 1, 2)
    for (lo, hi), arr in parts:
        inter = box.intersect(Box.from_bounds(lo, hi))
        out[(slice(None),) + inter.slices(box.lo)] = arr[(slice(None),) + inter.slices(lo)]
    return out


def _sources(names, boxes, channels, parts, scratch):
    """Each source's region: from the chunks in memory, read from its zarr scratch
    array (then the chunk values are only completion tokens), or read straight from
    the input volume (``scratch`` holds its RegionReader)."""
    out = {}
    for n, b, c, p, path in zip(names, boxes, channels, parts, scratch):
        if isinstance(path, RegionReader):
            if not Box.from_bounds(*b).empty:
                out[n] = path.read(*b)
            continue
        if not p:
            continue  # a tile lying wholly in a layer's padding reads nothing of it
        if path is None:
            out[n] = assemble(b, c, p)
        else:
            for _, token in p:
                if isinstance(token, PendingWrite):
                    token.wait()
            out[n] = open_scratch(path)[(slice(None),) + Box.from_bounds(*b).slices()]
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
    open_scratch(where)[region] = y


def open_scratch(where):
    """A kept tensor's scratch array: a `Location` (local or URL) or a local path."""
    if hasattr(where, "open_array"):
        return where.open_array("r+")
    import zarr
    return zarr.open_array(str(where), mode="r+")


def run_task(runner, stage, out_bounds, names, boxes, channels, parts, scratch, gnames, gvalues,
             write_to=None):
    box = Box.from_bounds(*out_bounds)
    try:
        y = runner.run(stage, box, _sources(names, boxes, channels, parts, scratch),
                       dict(zip(gnames, gvalues)), _origins(names, boxes))
    finally:
        release_freed_memory()  # the task's intermediates, before the next task
    if write_to is None:
        return y
    # a completion token; readers wait for it, then go to the scratch store
    return SCRATCH_WRITER.submit(write_to, (slice(None),) + box.slices(), y)


def stats_task(runner, barrier, out_bounds, names, boxes, channels, parts, scratch, gnames,
               gvalues):
    try:
        return runner.stats(barrier, Box.from_bounds(*out_bounds),
                            _sources(names, boxes, channels, parts, scratch),
                            dict(zip(gnames, gvalues)), _origins(names, boxes))
    finally:
        release_freed_memory()


def _origins(names, boxes) -> dict:
    """Where each source's region starts in its whole tensor (for messages)."""
    return {n: tuple(b[0]) for n, b in zip(names, boxes)}


def combine_task(*parts):
    return stats_combine(list(parts))


def value_task(runner, name, stats):
    return stats_value(stats, runner.globals[name], runner.dtype)


def eval_task(runner, name, gnames, gvalues):
    return runner.evaluate(name, dict(zip(gnames, gvalues)))


class _GraphBuilder:
    def __init__(self, plan: Plan, volume: da.Array, device: str, scratch=None, seed: int = 0,
                 autocast=None, reader=None, model_token=None):
        self.plan = plan
        self.volume = volume
        self.graph = plan.graph
        self.runner = ModelRunner(plan, device, seed, autocast)
        self.token = tokenize(volume.name, plan.chunks, device, seed, str(autocast),
                              model_token or weights_token(self.graph.gm))
        self.model_key = f"volarray-model-{self.token}"
        self.dsk = {self.model_key: self.runner}
        # kept tensor -> (key prefix, per-axis chunk boundaries)
        self.arrays = {self.graph.input: (volume.name, [np.cumsum((0,) + c) for c in volume.chunks[1:]])}
        for s in plan.stages:
            self.arrays[s.output] = (f"volarray-{s.output}-{self.token}", s.bounds)
        self.scratch = dict(scratch or {})  # kept node -> zarr scratch array path
        # the input read region by region straight from its array (one key of the graph)
        self.reader = reader
        if reader is not None:
            self.reader_key = f"volarray-input-{self.token}"
            self.scratch[self.graph.input] = self.reader_key

    def global_key(self, name: str) -> str:
        return f"volarray-global-{name}-{self.token}"

    def tile_args(self, prog, box: Box):
        """Arguments of a tile task: its sources' regions, the chunks they come
        from (lists, so that dask substitutes the keys) and the global values."""
        req = prog.requirements(box)
        names, boxes, channels, parts, scratch = [], [], [], [], []
        for src in prog.sources:
            scratch.append(self.scratch.get(src))
            need = req.box(src)
            names.append(src)
            boxes.append((need.lo, need.hi))
            channels.append(self.graph.nodes[src].channels)
            parts.append(self.chunk_parts(src, need))
        gnames = list(prog.globals)
        return (names, boxes, channels, parts, scratch, gnames,
                [self.global_key(g) for g in gnames])

    def chunk_parts(self, src: str, need: Box) -> list:
        """``[(bounds, key)]`` of the chunks of ``src`` that overlap ``need``; none for
        the input when tasks read it straight from its array."""
        if self.reader is not None and src == self.graph.input:
            return []
        key, bounds = self.arrays[src]
        ranges = [chunk_range(b, iv) for b, iv in zip(bounds, need.axes)]
        deps = []
        for i in ranges[0]:
            for j in ranges[1]:
                for k in ranges[2]:
                    lo = (int(bounds[0][i]), int(bounds[1][j]), int(bounds[2][k]))
                    hi = (int(bounds[0][i + 1]), int(bounds[1][j + 1]), int(bounds[2][k + 1]))
                    deps.append([(lo, hi), (key, 0, i, j, k)])
        return deps

    # Layers: one per stage (its tile tasks), per barrier (statistics tiles; their
    # combine tree and value), per whole-volume evaluation, and one for the model, each
    # named by its key prefix, so that dask's dashboard and task stream show which
    # stage runs. Only tile layers carry the GPU resource annotation.
    def build(self) -> da.Array:
        self.layers, self.deps = {}, {}
        vol_graph = self.volume.__dask_graph__()
        self.owner = {self.model_key: self.model_key}  # key prefix -> its layer
        self.add_layer(self.model_key, {self.model_key: self.runner}, tile=False)
        if self.reader is not None:
            vol_graph = HighLevelGraph({}, {})
            self.add_layer(self.reader_key, {self.reader_key: self.reader}, tile=False)
        for stage in self.plan.stages:
            self.owner[self.arrays[stage.output][0]] = self.arrays[stage.output][0]
        for b in self.plan.barriers:
            self.owner[self.global_key(b.name)] = f"volarray-stats-{b.name}-{self.token}-combine"
        for g in self.graph.globals.values():
            if g.kind == "eval":
                self.owner[self.global_key(g.name)] = self.global_key(g.name)
        for stage in self.plan.stages:
            key = self.arrays[stage.output][0]
            write_to = self.scratch.get(stage.output)
            dsk = {}
            for idx, box in grid_boxes(stage.bounds):
                dsk[(key, 0) + idx] = (run_task, self.model_key, stage.index,
                                       (box.lo, box.hi)) + self.tile_args(
                                           stage.program, box) + (write_to,)
            self.add_layer(key, dsk, tile=True, reads=self.reads(stage.program))
        for i, b in enumerate(self.plan.barriers):
            self.build_barrier(i, b)
        for g in self.graph.globals.values():
            if g.kind == "eval":
                key = self.global_key(g.name)
                self.add_layer(key, {key: (eval_task, self.model_key, g.name, list(g.deps),
                                           [self.global_key(d) for d in g.deps])},
                               tile=False, reads={self.owner[self.global_key(d)]
                                                  for d in g.deps})
        out = self.plan.output_stage
        node = self.graph.nodes[out.output]
        key = self.arrays[out.output][0]
        chunks = ((node.channels,),) + tuple(tuple(int(x) for x in np.diff(b)) for b in out.bounds)
        hlg = HighLevelGraph({**vol_graph.layers, **self.layers},
                             {**vol_graph.dependencies, **self.deps})
        return da.Array(hlg, key, chunks=chunks, meta=np.empty((0, 0, 0, 0), dtype=np.float32))

    def reads(self, prog) -> set[str]:
        """The layers a stage's or barrier's tiles read: the volume or kept tensors,
        and whole-volume values."""
        volume = self.volume.name if self.reader is None else self.reader_key
        out = {volume if src == self.graph.input else self.owner[self.arrays[src][0]]
               for src in prog.sources}
        return out | {self.owner[self.global_key(g)] for g in prog.globals}

    def add_layer(self, name: str, dsk: dict, tile: bool, reads=()):
        # one GPU task at a time per worker (workers started with --resources GPU=1)
        gpu = tile and self.runner.device.startswith("cuda")
        self.layers[name] = MaterializedLayer(
            dsk, annotations={"resources": {"GPU": 1}} if gpu else None)
        self.deps[name] = set(reads) | ({self.model_key} if name != self.model_key else set())

    def build_barrier(self, i: int, b):
        """Per-chunk partial statistics (a tile layer), merged by a tree of combine
        tasks ``split_every`` at a time, as dask's own reductions (a layer of its own)."""
        prefix = f"volarray-stats-{b.name}-{self.token}"
        tiles, level = {}, []
        for idx, box in grid_boxes(b.bounds):
            key = (prefix, 0) + idx
            tiles[key] = (stats_task, self.model_key, i, (box.lo, box.hi)) + self.tile_args(
                b.program, box)
            level.append(key)
        self.add_layer(prefix, tiles, tile=True, reads=self.reads(b.program))
        fan_in = combine_fan_in()
        combine, depth = {}, 0
        while len(level) > 1:
            depth += 1
            nxt = []
            for j in range(0, len(level), fan_in):
                key = (f"{prefix}-combine", depth, j)
                combine[key] = (combine_task,) + tuple(level[j:j + fan_in])
                nxt.append(key)
            level = nxt
        combine[self.global_key(b.name)] = (value_task, self.model_key, b.name, level[0])
        self.add_layer(f"{prefix}-combine", combine, tile=False, reads={prefix})


def combine_fan_in() -> int:
    """Partial statistics merged per combine task: dask's ``split_every`` setting (as
    its own reductions read it; a per-axis dict counts as the product of its values),
    else COMBINE_FAN_IN."""
    split = dask.config.get("split_every", None)
    if isinstance(split, dict):
        split = int(np.prod([int(v) for v in split.values()])) if split else None
    return max(2, int(split)) if split else COMBINE_FAN_IN


def build_graph(plan: Plan, volume: da.Array, device: str, scratch=None,
                seed: int = 0, autocast=None, reader=None, model_token=None) -> da.Array:
    """The lazy result of ``plan`` over ``volume`` (C, Z, Y, X). ``scratch`` maps kept
    tensors to zarr arrays that hold them instead of memory; ``seed`` picks the sample
    of stochastic layers; ``reader`` (a RegionReader of the array ``volume`` was made
    from) lets tasks read their input regions straight from it; ``model_token``: the
    captured model's `weights_token`, when the caller has it already."""
    return _GraphBuilder(plan, volume, device, scratch, seed, autocast, reader,
                         model_token).build()


def weights_token(gm) -> str:
    """Deterministic token of the weights and code."""
    return tokenize(gm.code, [(k, v.detach().cpu().numpy()) for k, v in gm.state_dict().items()])
