"""Candidate task grids: even splits of the volume aligned to the network's strides,
laid out for one kept set (every stage and barrier costed on the grid), and the grid
whose tasks fit memory, I/O and the scheduler's task count.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import costing
from .budget import default_memory_limit, parse_bytes
from .costing import Barrier, MIN_TILE_SIDE, Projection, Stage, cost_stage, nearest_kept, \
    project, reductions, stage_bounds, with_statistics
from .geometry import SPATIAL
from .graph import Graph, alignment
from .program import TileProgram


def candidate_chunks(shape, align, given=None) -> list[tuple[int, ...]]:
    """Even splits of the volume (1, 2, 3, ... chunks along its longest free axis),
    the free sides rounded up to the alignment, largest first. ``given``: the sides
    the user fixed, None on the free axes (as `coerce_chunks` returns them; None
    itself: every axis free)."""
    given = tuple(given) if given is not None else (None,) * len(shape)
    free = [a for a, c in enumerate(given) if c is None]
    if not free:
        return [given]
    longest = max(shape[a] for a in free)
    step = max(max(align[a] for a in free), 8)
    sides = {min(longest, -(-(-(-longest // k)) // step) * step)
             for k in range(1, longest // step + 2)}
    return [tuple(min(c, n) if g is None else g for n, g in zip(shape, given))
            for c in sorted(sides, reverse=True)]


# On CPU, tiles of ~100-200 MB run fastest (caches; FaultSeg3D at 128^3-192^3 was
# 10-25% slower with 400 MB tiles here): a task sweeps its region in slabs that fit.
CPU_TARGET_TILE_BYTES = 200e6
# A task's sources and output (what it reads and writes; with the chunks dask holds
# for it, several times this) stay below this on CPU: the same task size at every
# volume size, so memory does not grow with the volume.
TASK_IO_BYTES = 64e6
# Tasks grow past that where the graph would otherwise hold more than this many.
MAX_TASKS = 50_000


@dataclass(frozen=True)
class Layout:
    """The stages and barriers of one kept set on one task grid."""

    stages: tuple[Stage, ...]
    barriers: tuple[Barrier, ...]

    @property
    def peak_bytes(self) -> int:
        return max(part.peak_bytes for part in self.stages + self.barriers)

    @property
    def io_bytes(self) -> int:
        return max(s.io_bytes for s in self.stages)

    @property
    def n_tasks(self) -> int:
        return sum(s.n_tasks for s in self.stages) + sum(b.n_tasks for b in self.barriers)

    @property
    def macs(self) -> float:
        return sum(s.macs for s in self.stages) + sum(b.macs for b in self.barriers)

    def projected(self, rates) -> Projection:
        """Its projected time at ``rates`` (`costing.project`)."""
        return project(self.stages + self.barriers, rates)


@dataclass(frozen=True)
class Grid:
    """The task grid chosen for one kept set, with its layout."""

    base: tuple[int, ...]  # the input's chunk shape
    layout: Layout
    grown: bool  # past the grid that fit best, to keep the graph under MAX_TASKS tasks
    too_big: bool  # no candidate's tasks fit the memory limit


@dataclass(frozen=True)
class Planner:
    """Lays out stages and barriers on candidate task grids of one graph and picks
    the grid whose tasks fit: a task's peak within ``limit``, its sources and output
    within ``io_target``, swept in slabs of at most ``tile_target``."""

    graph: Graph
    limit: int
    tile_target: float
    io_target: float
    align: tuple[int, ...]
    strategy: str = "slab"  # 'whole': a task runs each layer over its whole region
    fixed_output: tuple[bool, ...] = (False,) * SPATIAL  # output chunk sides the user gave
    rates: object = None  # `volarray.rates.Rates` the layouts' times are projected at
    # costed stages by (output, sources, grid, min_side, holds_output): the kept sets a
    # search lays out share most of their stages (FaultSSL: 3,051 stages costed over
    # five layouts). Not copied by `dataclasses.replace` (init=False): a planner with
    # other fixed output chunks costs its own.
    _stages: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    _programs: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def for_device(cls, graph: Graph, memory_limit, device: str,
                   strategy: str = "slab", rates=None) -> "Planner":
        limit = parse_bytes(memory_limit) or default_memory_limit()
        on_cpu = device == "cpu"
        return cls(graph, limit, min(limit, CPU_TARGET_TILE_BYTES) if on_cpu else limit,
                   min(limit, TASK_IO_BYTES) if on_cpu else limit, alignment(graph), strategy,
                   rates=rates)

    def seconds(self, layout: Layout) -> float:
        """``layout``'s projected time at the planner's rates."""
        return layout.projected(self.rates).seconds

    def stage(self, index: int, prog: TileProgram, base, min_side: int,
              holds_output: bool = True) -> Stage:
        """The costed stage of ``prog`` on grid ``base``, swept in the thickest slab
        that fits."""
        key = (prog.output, prog.sources, tuple(base), min_side, holds_output)
        costed = self._stages.get(key)
        if costed is None:
            costed = self._stages[key] = self._cost_stage(prog, base, min_side, holds_output)
        return costed if costed.index == index else replace(costed, index=index)

    def program(self, name: str, avail) -> TileProgram:
        """The ops computing ``name`` from its nearest ancestors in ``avail`` (itself, if
        it is there: a kept tensor's stage reads it), one program per (name, sources)
        for all the layouts of a search."""
        sources = tuple(sorted(nearest_kept(self.graph, name, avail),
                               key=self.graph.order.__getitem__))
        prog = self._programs.get((name, sources))
        if prog is None:
            prog = self._programs[(name, sources)] = TileProgram(self.graph, name, sources)
        return prog

    def _cost_stage(self, prog: TileProgram, base, min_side: int, holds_output: bool) -> Stage:
        node = self.graph.nodes[prog.output]
        fixed = self.fixed_output if prog.output == self.graph.output else (False,) * SPATIAL
        bounds = stage_bounds(base, node.shape, node.scale, min_side, fixed)
        st, shapes = cost_stage(self.graph, Stage(-1, prog, bounds), holds_output)
        unit = max(1, int(self.align[0] * node.scale[0]))
        if self.strategy == "whole":
            return st  # each layer over the whole region: the grid fits it to the limit
        return costing.choose_slab(self.graph, st, shapes, self.tile_target, unit, self.limit)

    def stages(self, kept, base) -> tuple[Stage, ...]:
        """One stage per kept tensor, from its nearest kept ancestors; coarse levels
        merge small chunks where that fits."""
        avail = set(kept) | {self.graph.input}
        programs = [self.program(n, avail - {n}) for n in kept]
        for min_side in (MIN_TILE_SIDE, 1):
            stages = tuple(self.stage(i, p, base, min_side) for i, p in enumerate(programs))
            if max(s.peak_bytes for s in stages) <= self.limit:
                break
        return stages

    def barriers(self, kept, base) -> tuple[Barrier, ...]:
        """One barrier per reduction: its tasks compute (or read) the reduced tensor
        per chunk, projected as a stage's tasks are; coarse levels merge small chunks
        where that fits, as stages do."""
        avail = set(kept) | {self.graph.input}
        out = []
        for g in reductions(self.graph):
            probe = self.statistics_tasks(self.program(g.source, avail), base)
            out.append(Barrier(g.name, probe.program, probe.bounds, macs=probe.macs,
                               slab=probe.slab, peak_bytes=probe.peak_bytes,
                               moved_bytes=probe.moved_bytes,
                               touched_bytes=probe.touched_bytes))
        return tuple(out)

    def statistics_tasks(self, prog: TileProgram, base) -> Stage:
        """A barrier's tasks, projected as a stage's but holding no output region (each
        slab's output is reduced to statistics); coarse levels merge small chunks where
        that fits."""
        for min_side in (MIN_TILE_SIDE, 1):
            probe = self.stage(-1, prog, base, min_side, holds_output=False)
            if probe.peak_bytes <= self.limit:
                break
        return probe

    def layout(self, kept, base) -> Layout:
        return Layout(*with_statistics(self.stages(kept, base), self.barriers(kept, base)))

    def fits(self, layout: Layout) -> bool:
        return layout.peak_bytes <= self.limit and layout.io_bytes <= self.io_target

    def grid(self, kept, candidates) -> Grid:
        """The largest candidate grid whose tasks fit (the smallest if none does), grown
        where the graph would be too large for the scheduler."""
        chosen = None
        for i, cand in enumerate(candidates):  # largest first
            layout = self.layout(kept, cand)
            if self.fits(layout):
                chosen = i
                break
        too_big = chosen is None and layout.peak_bytes > self.limit
        if chosen is None:
            chosen = len(candidates) - 1
        grown = False
        while chosen > 0 and layout.n_tasks > MAX_TASKS:
            bigger = self.layout(kept, candidates[chosen - 1])
            if bigger.peak_bytes > self.limit:
                break
            chosen, layout, grown = chosen - 1, bigger, True
        return Grid(candidates[chosen], layout, grown, too_big)
