"""Stages, chunk choice and memory projection: what will run, before it runs.

The planner cuts the traced graph into stages at "kept" tensors: small tensors
(few floats per input voxel) that several stages read or that sit where the
resolution changes. Each stage runs per chunk of its output on a tile grown by
its own halo, recomputing the cheap, large tensors between kept ones. Keeping
deep features stops halos from compounding through an encoder-decoder.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import psutil

from .errors import InputError, MemoryBudgetError
from .geometry import chunk_bounds, intervals
from .program import TileProgram
from .trace import Graph

KEEP_FLOATS_PER_VOXEL = 4.0  # keep a tensor across stages if it is at most this big
MIN_TILE_SIDE = 16  # stages at coarse levels merge chunks below this side
# On CPU, tiles of ~100-200 MB run fastest (caches; FaultSeg3D at 128^3-192^3 was
# 10-25% slower with 400 MB tiles here), so the planner aims below this by default.
CPU_TARGET_TASK_BYTES = 200e6
# A task that sweeps several such tiles leaves at least this many tasks per thread.
MIN_TASKS_PER_THREAD = 4


def parse_bytes(value) -> int | None:
    """A memory budget in bytes from an int, a float or a string like '4GB'; None
    stays None (the default). What cannot be a budget is refused."""
    if value is None:
        return None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, (int, float)):
        n = value if math.isfinite(value) else None
    else:
        import dask.utils
        try:
            n = dask.utils.parse_bytes(str(value).strip().lstrip("+"))  # "-1GB" is negative
        except Exception:
            n = None
    if n is None:
        raise InputError(f"memory_limit={value!r} is not a size; pass bytes or a string "
                         "like '4GB'")
    if n <= 0:
        raise InputError(f"memory_limit={value!r} is not a budget: it must be positive, e.g. "
                         f"'2GB'; omit it for the default ({_fmt_bytes(default_memory_limit())} "
                         "per task here)")
    return int(n)


def default_memory_limit() -> int:
    """Per task: an eighth of this machine's memory, at most 2 GB."""
    return int(min(psutil.virtual_memory().total / 8, 2e9))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


@dataclass
class Stage:
    index: int
    program: TileProgram
    bounds: tuple[tuple[int, ...], ...]  # chunk boundaries of the output node, per axis
    peak_bytes: int = 0
    macs: float = 0.0  # computed, halos and recomputation included
    halo: tuple[int, ...] = (0, 0, 0)  # per side, in voxels of the stage's largest source
    # inner tiles: a task sweeps its region in tiles of at most this shape (output node
    # voxels), each computing its own halo; None: one tile per task
    tile: tuple[int, ...] | None = None
    io_bytes: int = 0  # a task's sources and output region (held while its tiles run)

    @property
    def output(self) -> str:
        return self.program.output

    @property
    def sources(self) -> tuple[str, ...]:
        return self.program.sources

    @property
    def n_tasks(self) -> int:
        return math.prod(len(b) - 1 for b in self.bounds)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return tuple(max(b[i + 1] - b[i] for i in range(len(b) - 1)) for b in self.bounds)


@dataclass
class Barrier:
    """Whole-volume statistics of one tensor: per-chunk partials merged by a tree."""

    name: str  # the GlobalNode
    program: TileProgram  # computes the reduced tensor per chunk (or reads it, if kept)
    bounds: tuple[tuple[int, ...], ...]
    macs: float = 0.0
    tile: tuple[int, ...] | None = None  # as Stage.tile

    @property
    def n_tasks(self) -> int:
        return math.prod(len(b) - 1 for b in self.bounds)

    @property
    def recomputed(self) -> bool:
        return self.program.output not in self.program.sources


@dataclass
class Plan:
    """The stages of an exact run, with their tiles, halos and projected memory."""

    graph: Graph
    stages: list[Stage]
    chunks: tuple[int, int, int]
    memory_limit: int
    model_macs: float  # one whole-volume forward
    kept_bytes: int  # all kept tensors between stages, whole volume
    notes: list[str] = field(default_factory=list)
    barriers: list[Barrier] = field(default_factory=list)
    chunks_chosen: bool = False  # the planner picked the smallest candidate and it did not fit

    @property
    def output_stage(self) -> Stage:
        return self.stages[-1]

    @property
    def n_tasks(self) -> int:
        return sum(s.n_tasks for s in self.stages) + sum(b.n_tasks for b in self.barriers)

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def compute_ratio(self) -> float:
        total = sum(s.macs for s in self.stages) + sum(b.macs for b in self.barriers)
        return total / max(self.model_macs, 1)

    def validate(self, memory_limit=None) -> "Plan":
        """Raise MemoryBudgetError, before anything runs, if a task's projected peak
        exceeds the limit; the message says which chunks or limit would fit."""
        limit = parse_bytes(memory_limit) or self.memory_limit
        worst = max(self.stages, key=lambda s: s.peak_bytes)
        if worst.peak_bytes > limit:
            fix = "pass smaller chunks or a larger memory_limit"
            if self.chunks_chosen:
                fix = (f"these are the smallest chunks the planner can align, so pass "
                       f"memory_limit >= {_fmt_bytes(worst.peak_bytes)}")
            raise MemoryBudgetError(
                f"stage {worst.index} ({worst.output}) needs {_fmt_bytes(worst.peak_bytes)} per "
                f"task with chunks={self.chunks}, above memory_limit={_fmt_bytes(limit)}; {fix}")
        return self

    def __str__(self) -> str:
        g = self.graph
        inp, out = g.nodes[g.input], g.nodes[g.output]
        lines = [
            f"volarray plan: exact mode, {len(self.stages)} stage(s), {self.n_tasks} tasks",
            f"  input  {inp.channels} x {inp.shape}   output {out.channels} x {out.shape}",
            f"  chunks {self.chunks}   memory limit {_fmt_bytes(self.memory_limit)} per task   "
            f"projected peak {_fmt_bytes(self.peak_bytes)} per task",
            f"  compute {self.compute_ratio:.2f}x one whole-volume forward "
            f"({self.model_macs / 1e9:.1f} GMAC); kept between stages "
            f"{_fmt_bytes(self.kept_bytes)}",
            "",
            f"  {'stage':>5}  {'output':<16} {'scale':<12} {'chunk':<16} {'tasks':>6} "
            f"{'halo':<12} {'peak/task':>10} {'ops':>4}  sources",
        ]
        for s in self.stages:
            node = g.nodes[s.output]
            scale = ",".join(str(x) for x in node.scale)
            if len(set(node.scale)) == 1:
                scale = str(node.scale[0])
            lines.append(
                f"  {s.index:>5}  {s.output[:16]:<16} {scale:<12} "
                f"{str(s.chunk_shape):<16} {s.n_tasks:>6} {str(s.halo):<12} "
                f"{_fmt_bytes(s.peak_bytes):>10} {len(s.program.order):>4}  {', '.join(s.sources)}")
        if self.barriers:
            lines.append("")
        for b in self.barriers:
            g = self.graph.globals[b.name]
            how = (f"recomputed from {', '.join(b.program.sources)} ({len(b.program.order)} ops)"
                   if b.recomputed else "read from the kept tensor")
            lines.append(f"  barrier {g.where}: statistics of {b.program.output} over "
                         f"{b.n_tasks} chunks, {how}, +{b.macs / max(self.model_macs, 1):.2f}x "
                         "compute")
        lines += [""] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip()

    def _repr_html_(self) -> str:
        import html
        return f"<pre>{html.escape(str(self))}</pre>"

    __repr__ = __str__


# ------------------------------------------------------------------ planning
def choose_kept(graph: Graph, threshold: float = KEEP_FLOATS_PER_VOXEL,
                budget: float = 0.0, barrier_budget: float = 0.0) -> list[str]:
    """Kept tensors: the output, plus candidates: tensors read by several ops, fed to
    a resolution change (skips, encoder/decoder levels) or reduced by a barrier.
    Small candidates (<= ``threshold`` floats per input voxel) are always kept;
    larger ones while the whole-volume bytes kept so far fit ``budget``, or
    ``barrier_budget`` for a barrier's input (recomputing that costs two extra
    passes, one for the statistics and one for the consumer, compounding through
    consecutive norms); the rest are recomputed by the stages that read them."""
    consumers = graph.consumers()
    reduced = {g.source for g in (graph.globals or {}).values() if g.kind == "reduce"}
    n_in = math.prod(graph.nodes[graph.input].shape)
    def size(name):
        return graph.nodes[name].floats_per_input_voxel * n_in * 4

    candidates, small = [], set()
    for name, node in graph.nodes.items():
        if node.op is None:
            continue
        uses = consumers[name]
        if name == graph.output:
            small.add(name)
        elif (len(uses) >= 2 or name in reduced
              or any(graph.nodes[u].op.changes_resolution for u in uses)):
            candidates.append(name)
            if node.floats_per_input_voxel <= threshold:
                small.add(name)
    spent = sum(size(n) for n in small if n != graph.output)
    kept = set(small)
    for name in candidates:  # large ones, in graph order, while the budget lasts
        if name not in small and spent + size(name) <= (
                barrier_budget if name in reduced else budget):
            kept.add(name)
            spent += size(name)
    return [n for n in graph.nodes if n in kept]


def program_for(graph: Graph, name: str, kept: set[str]) -> TileProgram:
    """The ops computing ``name`` from its nearest kept ancestors (or read it, if kept)."""
    if name in kept:
        return TileProgram(graph, name, (name,))
    sources, stack, seen = [], list(graph.nodes[name].inputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in kept:
            sources.append(n)
        else:
            stack.extend(graph.nodes[n].inputs)
    order = list(graph.nodes)
    return TileProgram(graph, name, tuple(sorted(sources, key=order.index)))


def build_stages(graph: Graph, kept: list[str]) -> list[TileProgram]:
    kept_set = set(kept) | {graph.input}
    return [program_for(graph, name, kept_set - {name}) for name in kept]


def stage_bounds(base: tuple[int, ...], shape: tuple[int, ...], scale,
                 min_side: int = MIN_TILE_SIDE) -> tuple:
    """Chunk boundaries of a node: the input grid mapped by the node's scale, with
    chunks merged up to ``min_side`` at coarse levels (fewer, less wasteful tasks)."""
    out = []
    for c, n, s in zip(base, shape, scale):
        side = max(1, int(round(c * s)))
        if side < min_side and s < 1:
            side *= math.ceil(min(min_side, n) / side)
        out.append(chunk_bounds(n, min(side, n)))
    return tuple(out)


def cost_stage(graph: Graph, stage: Stage) -> None:
    """Fill the stage's projected peak, computed MACs and halo (per-axis algebra)."""
    prog = stage.program
    sums = {n: [0, 0, 0] for n in prog.nodes}
    maxs = {n: [0, 0, 0] for n in prog.nodes}
    halo = [0, 0, 0]
    out_scale = graph.nodes[prog.output].scale
    ref = max(prog.sources, key=lambda s: graph.nodes[s].scale[0], default=prog.output)
    for axis, bounds in enumerate(stage.bounds):
        r = graph.nodes[ref].scale[axis] / out_scale[axis]
        for iv in intervals(bounds):
            node_iv, _ = prog.requirements_1d(axis, iv)
            for n, got in node_iv.items():
                sums[n][axis] += len(got)
                maxs[n][axis] = max(maxs[n][axis], len(got))
            src = node_iv.get(ref)
            if src is not None and not src.empty:
                ext = max(iv.lo * r - src.lo, src.hi - iv.hi * r)
                halo[axis] = max(halo[axis], math.ceil(ext))
    stage.macs = sum(graph.nodes[n].op.macs * math.prod(sums[n]) for n in prog.order)
    stage.peak_bytes = prog.peak_bytes({n: tuple(m) for n, m in maxs.items()})
    stage.io_bytes = sum(graph.nodes[n].channels * 4 * math.prod(maxs[n])
                         for n in set(prog.sources) | {prog.output})
    stage.halo = tuple(halo)


def alignment(graph: Graph) -> tuple[int, ...]:
    """Chunk sides that map to whole voxels on every level (cumulative stride)."""
    out = []
    for axis in range(3):
        den = 1
        for node in graph.nodes.values():
            s = node.scale[axis]
            if s < 1:
                den = math.lcm(den, Fraction(s).denominator)
        out.append(den)
    return tuple(out)


def candidate_chunks(shape, align) -> list[tuple[int, ...]]:
    """Even splits of the volume (1, 2, 3, ... chunks along the longest axis), sides
    rounded up to the alignment, largest first."""
    step = max(max(align), 8)
    sides = {min(max(shape), -(-(-(-max(shape) // k)) // step) * step)
             for k in range(1, max(shape) // step + 2)}
    return [tuple(min(c, n) for n in shape) for c in sorted(sides, reverse=True)]


# A task's sources and output region count this many times in its projected peak: read,
# filled tile by tile, converted and written, and held by the scheduler (measured:
# FaultSeg3D 512^3 zarr to zarr, 2 threads, peaked 3.7 GB above baseline with tasks
# whose sources and output were 244 MB, ~7.6x; the plan had projected 3x)
IO_COPIES = 8
# Tasks group tiles only where the scheduler would otherwise carry this many tasks:
# below, tasks of one tile keep memory lowest (2.1 GB at 512^3, against 4.0 GB grouped)
GROUP_ABOVE_TASKS = 20_000
MAX_TILES_PER_TASK = 512  # 8 per axis: beyond, tasks gain little and resume loses much


def tasks_of_tiles(tiles: list[Stage], tile_base, shape, limit, stages_for):
    """The largest task grid, a whole multiple of the tile grid, whose tasks (their
    sources and output, held while their tiles run, plus one tile's peak) fit
    ``limit``. Compute is the tile grid's: each tile computes its own halo."""
    best_base, best = tile_base, tiles
    tile_peak = max(s.peak_bytes for s in tiles)
    for k in range(2, round(MAX_TILES_PER_TASK ** (1 / 3)) + 1):
        base = tuple(min(n, c * k) for n, c in zip(shape, tile_base))
        if base == best_base:
            break
        stages = stages_for(base, float("inf"))
        if IO_COPIES * max(s.io_bytes for s in stages) + tile_peak > limit or \
                stages[0].n_tasks < MIN_TASKS_PER_THREAD * (os.cpu_count() or 1):
            break
        for st, tile in zip(stages, tiles):
            st.macs, st.halo, st.tile = tile.macs, tile.halo, tile.chunk_shape
            st.peak_bytes = IO_COPIES * st.io_bytes + tile.peak_bytes
        best_base, best = base, stages
    return best_base, best


def make_plan(graph: Graph, chunks=None, memory_limit=None, device: str = "cpu",
              keep_threshold: float = KEEP_FLOATS_PER_VOXEL) -> Plan:
    limit = parse_bytes(memory_limit) or default_memory_limit()
    inp = graph.nodes[graph.input]
    shape = inp.shape
    kept = choose_kept(graph, keep_threshold, budget=limit / 4, barrier_budget=2 * limit)
    programs = build_stages(graph, kept)
    reductions = [g for g in (graph.globals or {}).values() if g.kind == "reduce"]
    barrier_programs = [program_for(graph, g.source, set(kept) | {graph.input})
                        for g in reductions]
    model_macs = sum(n.op.macs * math.prod(n.shape) for n in graph.nodes.values() if n.op)
    kept_bytes = sum(graph.nodes[p.output].channels * 4 * math.prod(graph.nodes[p.output].shape)
                     for p in programs[:-1])

    def stages_for(base, target):
        """Stages on grid ``base``; coarse levels merge small chunks if that fits."""
        for min_side in (MIN_TILE_SIDE, 1):
            stages = []
            for i, prog in enumerate(programs):
                node = graph.nodes[prog.output]
                st = Stage(i, prog, stage_bounds(base, node.shape, node.scale, min_side))
                cost_stage(graph, st)
                stages.append(st)
            if max(s.peak_bytes for s in stages) <= target:
                break
        return stages

    notes = []
    chunks_given, smallest_too_big = chunks, False
    if chunks is None:
        align = alignment(graph)
        target = limit if device != "cpu" else min(limit, CPU_TARGET_TASK_BYTES)
        for base in candidate_chunks(shape, align):
            stages = stages_for(base, target)
            if max(s.peak_bytes for s in stages) <= target:
                break
        smallest_too_big = max(s.peak_bytes for s in stages) > limit
        tile_base, tiles = base, stages
        if device == "cpu" and not smallest_too_big and \
                sum(s.n_tasks for s in stages) > GROUP_ABOVE_TASKS:
            # tasks of several tiles: fewer, larger tasks (scheduling, I/O and resume
            # units) that sweep their region in the cache-sized tiles that run fastest
            base, stages = tasks_of_tiles(tiles, tile_base, shape, limit, stages_for)
        chunks = base
        split = f"the largest even split aligned to {align} whose tiles fit {_fmt_bytes(target)}"
        notes.append(f"chunks {chunks} chosen: {split}" if chunks == tile_base else
                     f"chunks {chunks} chosen: tasks of whole tiles {tile_base} ({split}) "
                     f"that fit {_fmt_bytes(limit)}, swept tile by tile")
    else:
        stages = stages_for(chunks, limit)
    barriers = []
    for g, prog in zip(reductions, barrier_programs):
        node = graph.nodes[g.source]
        b = Barrier(g.name, prog, stage_bounds(chunks, node.shape, node.scale))
        probe = Stage(-1, prog, b.bounds)
        cost_stage(graph, probe)
        b.macs = probe.macs
        if chunks_given is None and chunks != tile_base:
            tile_probe = Stage(-1, prog, stage_bounds(tile_base, node.shape, node.scale))
            cost_stage(graph, tile_probe)
            b.macs, b.tile = tile_probe.macs, tile_probe.chunk_shape
        barriers.append(b)
    return Plan(graph, stages, tuple(chunks), limit, model_macs, kept_bytes, notes, barriers,
                chunks_chosen=chunks_given is None and smallest_too_big)
