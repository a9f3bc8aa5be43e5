"""The dask graph: one blockwise layer per stage, barrier reductions as trees.

The model (traced module, weights and tile programs) is a single key of the
graph that every task depends on, so a distributed worker receives it once and
keeps it, instead of deserializing weights inside every task. What the tasks run
is in `volarray.worker`.
"""
from __future__ import annotations

from collections import Counter

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from .geometry import Box, chunk_range, grid_boxes
from .planner import Plan
from .worker import (ArraySource, ChunkSource, ModelRunner, ScratchSource, TaskSpec,
                     combine_task, eval_task, run_task, statistics_of, stats_task, value_task)

COMBINE_FAN_IN = 8  # partial statistics merged per combine task


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
            self.arrays[s.output] = (self.layer_name(f"stage-{s.index}-{op_label(s.program)}"),
                                     s.bounds)
        # kept node -> its zarr scratch array; the input read straight from its array
        # (its VolumeSource: one key of the graph, fetched by the tasks that read it)
        self.sources = {n: ScratchSource(n, where) for n, where in (scratch or {}).items()}
        self.reader = reader
        if reader is not None:
            self.reader_key = f"volarray-input-{self.token}"
            self.sources[self.graph.input] = ArraySource(self.graph.input)

    def global_key(self, name: str) -> str:
        return f"volarray-global-{name}-{self.token}"

    def layer_name(self, what: str) -> str:
        """``volarray-<what>-<token>``: what runs (``stage-2-conv``, ``stats-1``) first,
        so that dask's dashboard and task stream show volarray's phases."""
        return f"volarray-{what}-{self.token}"

    def task(self, fn, index: int, prog, box: Box, write_to=None, statistics=()) -> tuple:
        """A tile or statistics task: its frozen `TaskSpec` (with each read's chunk
        bounds), then what dask fetches for it (lists of keys, so that dask substitutes
        them, and nothing else for dask to walk: FaultSSL's graph spent 0.4 s in dask's
        conversion of nested bounds): per source read, the chunks it comes from (or the
        input's array), and the whole-volume values."""
        req = prog.requirements(box)
        reads, parts = [], []
        for src in prog.sources:
            need = req.box(src)
            source = self.sources.get(src) or ChunkSource(src, self.graph.nodes[src].channels)
            if isinstance(source, ArraySource):
                reads.append((source, (need.lo, need.hi), None))
                parts.append(self.reader_key)
            else:
                chunks, keys = self.chunk_parts(src, need)
                reads.append((source, (need.lo, need.hi), chunks))
                parts.append(keys)
        spec = TaskSpec(index, (box.lo, box.hi), tuple(reads), tuple(prog.globals), write_to,
                        statistics)
        return (fn, self.model_key, spec, parts, [self.global_key(g) for g in prog.globals])

    def chunk_parts(self, src: str, need: Box) -> tuple[tuple, list]:
        """The ``(lo, hi)`` bounds and the keys of the chunks of ``src`` that overlap
        ``need``."""
        key, bounds = self.arrays[src]
        ranges = [chunk_range(b, iv) for b, iv in zip(bounds, need.axes)]
        chunks, keys = [], []
        for i in ranges[0]:
            for j in ranges[1]:
                for k in ranges[2]:
                    lo = (int(bounds[0][i]), int(bounds[1][j]), int(bounds[2][k]))
                    hi = (int(bounds[0][i + 1]), int(bounds[1][j + 1]), int(bounds[2][k + 1]))
                    chunks.append((lo, hi))
                    keys.append((key, 0, i, j, k))
        return tuple(chunks), keys

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
        # per stage, the barriers whose statistics its tasks compute (`Barrier.by_stage`)
        self.statistics = {}
        for i, b in enumerate(self.plan.barriers):
            self.owner[self.global_key(b.name)] = self.layer_name(f"stats-{i}-combine")
            if b.by_stage is not None:
                self.statistics[b.by_stage] = self.statistics.get(b.by_stage, ()) + (i,)
        for g in self.graph.globals.values():
            if g.kind == "eval":
                self.owner[self.global_key(g.name)] = self.global_key(g.name)
        for stage in self.plan.stages:
            key = self.arrays[stage.output][0]
            scratch = self.sources.get(stage.output)
            write_to = scratch.where if isinstance(scratch, ScratchSource) else None
            dsk = {(key, 0) + idx: self.task(run_task, stage.index, stage.program, box,
                                             write_to, self.statistics.get(stage.index, ()))
                   for idx, box in grid_boxes(stage.bounds)}
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
        """Per-chunk partial statistics (a tile layer, or, where a stage's tasks compute
        them, a layer picking them up), merged by a tree of combine tasks
        ``split_every`` at a time, as dask's own reductions (a layer of its own)."""
        prefix = self.layer_name(f"stats-{i}")
        tiles, level = {}, []
        if b.by_stage is not None:  # picked up from the stage's tasks, on the same grid
            stage_key = self.arrays[b.program.output][0]
            position = self.statistics[b.by_stage].index(i)
        for idx, box in grid_boxes(b.bounds):
            key = (prefix, 0) + idx
            tiles[key] = (statistics_of, (stage_key, 0) + idx, position) \
                if b.by_stage is not None else self.task(stats_task, i, b.program, box)
            level.append(key)
        self.add_layer(prefix, tiles, tile=b.by_stage is None,
                       reads={stage_key} if b.by_stage is not None else self.reads(b.program))
        fan_in = combine_fan_in()
        combine, depth = {}, 0
        combine_name = self.layer_name(f"stats-{i}-combine")
        while len(level) > 1:
            depth += 1
            nxt = []
            for j in range(0, len(level), fan_in):
                key = (combine_name, depth, j)
                combine[key] = (combine_task,) + tuple(level[j:j + fan_in])
                nxt.append(key)
            level = nxt
        combine[self.global_key(b.name)] = (value_task, self.model_key, b.name, level[0])
        self.add_layer(combine_name, combine, tile=False, reads={prefix})


LIGHT_OPS = ("pointwise", "normapply", "broadcast", "pad", "fill", "flip")


def op_label(prog) -> str:
    """What a stage's tasks run, for its layer name: the most frequent op family of its
    program other than per-voxel ones (``conv``, ``pool``, ``resample``...)."""
    kinds = [type(prog.nodes[n].op).__name__.lower() for n in prog.order]
    heavy = [k for k in kinds if k not in LIGHT_OPS] or kinds or ["read"]
    return Counter(heavy).most_common(1)[0][0]


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
    of stochastic layers; ``reader`` (the `readers.VolumeSource` ``volume`` was made
    from) lets tasks read their input regions straight from it; ``model_token``: the
    captured model's `weights_token`, when the caller has it already."""
    return _GraphBuilder(plan, volume, device, scratch, seed, autocast, reader,
                         model_token).build()


def weights_token(gm) -> str:
    """Deterministic token of the weights and code, and of the tensors the graph holds
    as constants (a model's plain tensor attribute, not in its state_dict)."""
    import torch
    from .devices import token_array
    constants = [(name, k, token_array(v)) for name, m in gm.named_modules()
                 for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
    return tokenize(gm.code, [(k, token_array(v)) for k, v in gm.state_dict().items()],
                    constants)
