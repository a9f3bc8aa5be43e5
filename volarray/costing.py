"""A stage and what it costs: the task grid it runs on, its computed MACs (halos and
recomputation included), its I/O bytes, its projected peak per task, and the slab its
tasks sweep their regions in. Bytes per value come from the graph's dtype.

A task sweeping its region along z in slabs keeps the rows the next slab reads, so
halos inside a task are computed once; it is swept only where that holds much less
memory than running the region whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .geometry import EMPTY, SPATIAL, Interval, chunk_bounds, intervals
from .graph import Graph
from .program import TileProgram, stage_nodes

MIN_TILE_SIDE = 16  # stages at coarse levels merge chunks below this side


def grid_tasks(bounds) -> int:
    """Chunks of a grid given per-axis boundaries."""
    return math.prod(len(b) - 1 for b in bounds)


def grid_chunk_shape(bounds) -> tuple[int, ...]:
    """The largest chunk side of a grid, per axis."""
    return tuple(max(b[i + 1] - b[i] for i in range(len(b) - 1)) for b in bounds)


class OnGrid:
    """What a stage or a barrier's statistics (with per-axis ``bounds``) runs over."""

    @property
    def n_tasks(self) -> int:
        return grid_tasks(self.bounds)

    @property
    def costed_tasks(self) -> int:
        """The tasks the projection charges: all of them, for a stage."""
        return self.n_tasks

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return grid_chunk_shape(self.bounds)


@dataclass(frozen=True)
class Stage(OnGrid):
    """A fused stage: its program runs per task of its output's chunk grid."""

    index: int
    program: TileProgram
    bounds: tuple[tuple[int, ...], ...]  # chunk boundaries of the output node, per axis
    peak_bytes: int = 0  # projected per task
    macs: float = 0.0  # computed, halos and recomputation included
    halo: tuple[int, ...] = (0, 0, 0)  # per side, in voxels of the stage's largest source
    # a task sweeps its region along z in slabs of this many rows (of its output),
    # keeping the rows the next slab reads; None: the whole region as one tile
    slab: int | None = None
    io_bytes: int = 0  # a task's sources and output region (held while it runs)
    moved_bytes: int = 0  # every task's sources read and output written, whole volume
    touched_bytes: int = 0  # every op's output over every task (halos, recomputation)

    @property
    def output(self) -> str:
        return self.program.output

    @property
    def sources(self) -> tuple[str, ...]:
        return self.program.sources


@dataclass(frozen=True)
class Barrier(OnGrid):
    """Whole-volume statistics of one tensor: per-chunk partials merged by a tree.
    Each chunk's task runs ``program`` over its region, so it is projected as a
    stage's task is (``peak_bytes``, ``slab``)."""

    name: str  # the GlobalNode
    program: TileProgram  # computes the reduced tensor per chunk (or reads it, if kept)
    bounds: tuple[tuple[int, ...], ...]
    macs: float = 0.0
    slab: int | None = None  # as Stage.slab
    peak_bytes: int = 0  # projected per task, as Stage.peak_bytes
    moved_bytes: int = 0  # every task's sources read, whole volume
    touched_bytes: int = 0  # as Stage.touched_bytes
    # the stage whose tasks compute these statistics from their own output as they
    # make it (`with_statistics`); None: tasks of the barrier's own read the tensor
    by_stage: int | None = None

    @property
    def recomputed(self) -> bool:
        return self.program.output not in self.program.sources

    @property
    def costed_tasks(self) -> int:
        """None where a stage computes the statistics (what is left of the barrier's
        tasks only picks them up)."""
        return 0 if self.by_stage is not None else self.n_tasks


def with_statistics(stages, barriers) -> tuple[tuple, tuple]:
    """``stages`` and ``barriers``, with the barriers that read a kept tensor on its
    stage's own grid computed by that stage's tasks (`Barrier.by_stage`): each task
    reduces its output to statistics as it makes it, and no task reads the tensor again
    for them (FaultSSL: 546 of its 1,190 tasks; InstanceNormUNet 128^3: a second read of
    every kept tensor from scratch). Such a stage's peak grows by its output tile in
    float32 where values are smaller (the statistics read a float32 copy). The model's
    output stays a plain array: its stage never does this."""
    by_output = {s.output: s for s in stages[:-1]}
    out, computing = [], set()
    for b in barriers:
        s = by_output.get(b.program.output)
        if s is not None and not b.recomputed and tuple(map(tuple, s.bounds)) == tuple(
                map(tuple, b.bounds)):
            b = replace(b, by_stage=s.index, moved_bytes=0, macs=0.0, peak_bytes=0)
            computing.add(s.index)
        out.append(b)

    def with_copy(s: Stage) -> Stage:
        if s.index not in computing or s.program.value_bytes >= 4:
            return s
        tile = math.prod(s.chunk_shape) * s.program.nodes[s.output].channels * 4
        return replace(s, peak_bytes=s.peak_bytes + tile)
    return tuple(with_copy(s) for s in stages), tuple(out)


def nearest_kept(graph: Graph, name: str, kept) -> set[str]:
    """The nearest ancestors of ``name`` in ``kept`` (itself, if it is kept)."""
    if name in kept:
        return {name}
    found, stack, seen = set(), list(graph.nodes[name].inputs), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in kept:
            found.add(n)
        else:
            stack.extend(graph.nodes[n].inputs)
    return found


def reductions(graph: Graph) -> list:
    return [g for g in (graph.globals or {}).values() if g.kind == "reduce"]


def model_macs(graph: Graph) -> float:
    """The MACs of one whole-volume forward."""
    return sum(n.op.macs * math.prod(n.shape) for n in graph.nodes.values() if n.op)


def stage_bounds(base: tuple[int, ...], shape: tuple[int, ...], scale,
                 min_side: int = MIN_TILE_SIDE, fixed=(False,) * SPATIAL) -> tuple:
    """Chunk boundaries of a node: the input grid mapped by the node's scale, with
    chunks merged up to ``min_side`` at coarse levels (fewer, less wasteful tasks),
    except on the ``fixed`` axes (the output's, where the user gave the chunks)."""
    out = []
    for c, n, s, keep in zip(base, shape, scale, fixed):
        side = fixed_side(c, s, n) if keep else max(1, int(round(c * s)))
        if side < min_side and s < 1 and not keep:
            side *= math.ceil(min(min_side, n) / side)
        out.append(chunk_bounds(n, min(side, n)))
    return tuple(out)


def fixed_side(c: int, s, n: int) -> int:
    """The output's chunk side from input chunks of ``c`` at scale ``s`` on an axis of
    ``n`` output voxels, where the user gave it: the whole axis when ``c`` covers it (an
    odd input halved), else ``c * s`` rounded."""
    return n if c * s > n - 1 else max(1, int(round(c * s)))


def cost_stage(graph: Graph, stage: Stage, holds_output: bool = True) -> tuple[Stage, dict]:
    """``stage`` with its computed MACs, halo, I/O bytes and whole-task peak filled in
    (per-axis algebra; the region run whole, ``slab=None``), and each node's largest
    region shape. A task sweeping its region in slabs computes each halo once, so its
    MACs are those of one whole-region tile. ``holds_output``: the task assembles its
    output region (a barrier's task reduces each slab's output and holds none)."""
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
    shapes = {n: tuple(m) for n, m in maxs.items()}
    held = set(prog.sources) | ({prog.output} if holds_output else set())
    moved = sum(graph.nodes[n].channels * graph.value_bytes * math.prod(
        graph.nodes[n].shape if n == prog.output else sums[n]) for n in held)
    costed = replace(
        stage, macs=sum(graph.nodes[n].op.macs * math.prod(sums[n]) for n in prog.order),
        touched_bytes=touched_bytes(graph, prog, sums, holds_output),
        peak_bytes=prog.peak_bytes(shapes), halo=tuple(halo), slab=None,
        io_bytes=sum(graph.nodes[n].channels * graph.value_bytes * math.prod(maxs[n]) for n in held),
        moved_bytes=moved)
    return costed, shapes


# channels-last statistics (`ops.reduce.channel_var_mean`): 1.4-3.4 times a ReLU's cost
# per byte read, from one run to the next (`benchmarks/results/op_rates.md`)
STATS_PASSES = 2.5


def touched_bytes(graph: Graph, prog: TileProgram, sums: dict, holds_output: bool) -> int:
    """The bytes of the op outputs a stage's tasks write, over all of them (``sums``:
    each node's voxels, per axis, summed over the tasks), each weighted by its op's
    `memory_passes` (a trilinear upsampling's byte costs eight of a ReLU's): memory-
    bound work. A ReLU run in its conv's kernel (`TileProgram.passed_on`) writes
    nothing; a barrier's task (not ``holds_output``) reads its output once more for
    the statistics."""
    def nbytes(n):
        return graph.nodes[n].channels * graph.value_bytes * math.prod(sums[n])
    written = sum(nbytes(n) * graph.nodes[n].op.memory_passes for n in prog.order
                  if n not in prog.passed_on)
    return int(written + (0 if holds_output else STATS_PASSES * nbytes(prog.output)))


def estimated_macs(graph: Graph, name: str, sources, bounds, index: dict) -> float:
    """The MACs of the stage computing ``name`` from ``sources`` on a grid of ``bounds``
    (the output node's, per axis), estimated from one interior task per axis: each
    of the other k - 1 task boundaries along an axis recomputes a node's halo there
    (what that task reads beyond its own share, both sides), and no task computes
    more than the whole axis. One pass per axis instead of `cost_stage`'s one per
    interval, and no `TileProgram`: ranking kept sets (`volarray.keep.keep_sequence`)
    costs thousands of stages on a norm-heavy network. ``index``: graph order."""
    nodes, scales = graph.nodes, graph.float_scales
    sources = set(sources)
    order = sorted(stage_nodes(graph, name, sources) - sources, key=index.__getitem__)
    out_scale = scales[name]
    sums = {n: 1.0 for n in order}
    for axis, b in enumerate(bounds):
        k = len(b) - 1
        if k == 1:  # one task along the axis: each node computed once, whole
            for n in order:
                sums[n] *= nodes[n].shape[axis]
            continue
        i = k // 2
        out = Interval(b[i], b[i + 1])
        need = {name: out}
        for n in reversed(order):
            iv = need.get(n)
            if iv is None or iv.empty:
                continue
            node = nodes[n]
            for p, want in zip(node.inputs, node.op.need(axis, iv)):
                need[p] = need[p].union(want) if p in need else want
        for n in order:
            size = nodes[n].shape[axis]
            share = len(out) * scales[n][axis] / out_scale[axis]
            extra = max(0.0, len(need.get(n, EMPTY)) - share)
            sums[n] *= min(k * size, size + (k - 1) * extra)
    return sum(nodes[n].op.macs * sums[n] for n in order)


def sweep_bytes(graph: Graph, stage: Stage, shapes: dict, rows: int) -> tuple[int, int]:
    """A task swept in slabs of ``rows``: the bytes of one interior slab's tensors
    (its working set), and the task's projected peak: its sources and output, that
    slab, and each node's row buffer, sized as the sweep sizes it (`RowBuffer`): the
    rows it holds for the next slab (the halo its consumers' new rows read) and the
    next slab's new rows, twice over for the ring to slide in."""
    prog = stage.program
    n = graph.nodes[prog.output].shape[0]
    k = max(0, n // rows // 2 - 1)
    # the first of these slabs computes whole regions, as after a fresh start; the
    # second is the sweep's steady state
    a, b, c = prog.sweep_rows([Interval(min(n, i * rows), min(n, (i + 1) * rows))
                               for i in (k, k + 1, k + 2)])
    row_bytes = {m: graph.nodes[m].channels * graph.value_bytes * math.prod(shapes[m][1:])
                 for m in shapes}
    first, new, stores, written = {}, {}, {}, {}
    for m, iv in b.items():
        if m in prog.sources or m not in shapes:
            continue
        done = a[m].hi if m in a else iv.lo  # the rows computed before this slab
        new[m] = (max(0, iv.hi - max(done, iv.lo)),) + shapes[m][1:]
        held = max(0, iv.hi - c[m].lo) if m in c else 0
        room = max(0, c[m].hi - iv.hi) if m in c else 0
        if held:  # the ring, written through as the sweep goes on
            stores[m] = 2 * (held + room) * row_bytes[m]
    for m, iv in a.items():  # a task's first slab computes every node's rows ahead
        if m not in prog.sources and m in shapes:
            first[m] = (len(iv),) + shapes[m][1:]
            if m in b and iv.hi > b[m].lo:  # only its held rows written yet
                written[m] = (iv.hi - b[m].lo) * row_bytes[m]
    return (prog.peak_bytes(new), stage.io_bytes + max(
        prog.peak_bytes(new, stores=stores), prog.peak_bytes(first, stores=written)))


def region_sweep_bytes(graph: Graph, stage: Stage, shapes: dict, rows: int) -> int:
    """The peak `sweep_bytes` projected before a sweep held only the rows its
    consumers' new rows read: every node holding its whole slab region's overlap with
    the next slab's. Whether to sweep at all is still decided by it (the rule below
    was measured against it; the cost model will decide it by time)."""
    prog = stage.program
    n = graph.nodes[prog.output].shape[0]
    k = max(0, n // rows // 2 - 1)
    a, b = Interval(k * rows, min(n, (k + 1) * rows)), Interval(
        min(n, (k + 1) * rows), min(n, (k + 2) * rows))
    ra, _ = prog.requirements_1d(0, a)
    rb, _ = prog.requirements_1d(0, b)
    held = {m: graph.nodes[m].channels * graph.value_bytes * max(0, iv.hi - rb[m].lo)
            * math.prod(shapes[m][1:]) for m, iv in ra.items()
            if m not in prog.sources and m in rb}
    slab_shapes = {m: (len(ra[m]),) + s[1:] for m, s in shapes.items() if m in ra}
    return stage.io_bytes + prog.peak_bytes(slab_shapes, stores=held)


# Thin slabs cost time (per-slab overheads, thin convolutions at coarse levels):
# FaultSeg3D's single 128^3 task swept in 8-row slabs ran 1.7x slower than whole, for
# 17% less memory (with buffers that moved their rows every slab; 160^3 ran 12-19%
# slower in 8- to 32-row slabs without). A task is swept only where that holds at
# most this fraction of its whole-region peak (`region_sweep_bytes`).
SWEEP_SAVING = 0.75


def choose_slab(graph: Graph, stage: Stage, shapes: dict, target: float, unit: int,
                limit: float = math.inf) -> Stage:
    """``stage`` swept in the thickest slab (``unit`` rows times a power of two) whose
    working set fits ``target`` and whose task fits ``limit`` (the thinnest if none
    does), or run whole where the whole region fits ``target`` or sweeping would not
    hold less than `SWEEP_SAVING` of it."""
    depth = stage.chunk_shape[0]
    if stage.peak_bytes <= target or depth <= unit or not stage.program.order:
        return stage
    peak = sweep_bytes(graph, stage, shapes, unit)[1]
    if region_sweep_bytes(graph, stage, shapes, unit) > SWEEP_SAVING * stage.peak_bytes:
        return stage  # sweeping would save too little memory for its time
    rows = unit
    while rows * 2 < depth:
        slab, thicker = sweep_bytes(graph, stage, shapes, rows * 2)
        if slab > target or thicker > limit:
            break
        rows, peak = rows * 2, thicker
    return replace(stage, slab=rows, peak_bytes=peak)


@dataclass(frozen=True)
class Projection:
    """A plan's projected time and its parts, in seconds: its MACs at the device's
    rate, the bytes its tasks read and write at the storage's rate, a per-task
    overhead times its tasks, and its ops' output bytes at the memory rate (memory-
    bound work: norms, activations, copies; 0 where the rates have none)."""

    compute_s: float = 0.0
    io_s: float = 0.0
    overhead_s: float = 0.0
    memory_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.compute_s + self.io_s + self.overhead_s + self.memory_s


def project(parts, rates) -> Projection:
    """The projected time of stages and barriers ``parts`` at ``rates`` (a
    `volarray.rates.Rates`; None: MACs only, at one MAC a second, as plans were
    chosen before rates)."""
    macs = sum(p.macs for p in parts)
    if rates is None:
        return Projection(compute_s=macs)
    memory = rates.memory_bytes_per_s
    return Projection(macs / rates.macs_per_s,
                      sum(p.moved_bytes for p in parts) / rates.bytes_per_s,
                      sum(p.costed_tasks for p in parts) * rates.task_s,
                      sum(p.touched_bytes for p in parts) / memory if memory else 0.0)
