"""Stages, task grid and memory projection: what will run, before it runs.

The planner keeps some tensors between stages and recomputes the rest: it adds,
while their bytes fit the keep budget, the tensors that save the most compute per
byte (with nothing kept, a norm-free network runs depth-first, each task from the
input with its receptive field's halo). Each stage runs per task of its output on a
region grown by its halo; a task sweeps that region along z in slabs that fit the
cache, keeping the rows the next slab reads, so halos inside a task are computed
once. Tasks keep the same size at every volume size, so memory does not grow with
the volume.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, replace
from fractions import Fraction

import psutil

from .errors import InputError, MemoryBudgetError
from .geometry import (AXIS_NAMES, SPATIAL, Interval, chunk_bounds, coerce_chunks,
                       intervals)
from .program import TileProgram
from .taskcount import TASK_WARNING, fewer_chunks, warn_of_many_tasks, warn_of_tiny_chunks
from .trace import Graph

MIN_TILE_SIDE = 16  # stages at coarse levels merge chunks below this side


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
                         "like '4GB'", parameter='memory_limit')
    if n <= 0:
        raise InputError(f"memory_limit={value!r} is not a budget: it must be positive, e.g. "
                         f"'2GB'; omit it for the default ({format_bytes(default_memory_limit())} "
                         "per task here)", parameter='memory_limit')
    return int(n)


def default_memory_limit() -> int:
    """Per task: an eighth of this machine's memory, at most 2 GB."""
    return int(min(psutil.virtual_memory().total / 8, 2e9))


def format_bytes(n: float) -> str:
    """``1.2 GB``: decimal units, as dask's memory limits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


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

    @property
    def recomputed(self) -> bool:
        return self.program.output not in self.program.sources


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass(frozen=True, eq=False)
class Plan:
    """The stages of an exact run, with their tiles, halos and projected memory:
    built complete by `make_plan`, never changed after (`dataclasses.replace` makes
    a changed copy)."""

    graph: Graph
    stages: tuple[Stage, ...]
    chunks: tuple[int, int, int]
    memory_limit: int
    model_macs: float  # one whole-volume forward
    kept_bytes: int  # all kept tensors between stages, whole volume
    notes: tuple[str, ...] = ()
    barriers: tuple[Barrier, ...] = ()
    # the planner chose the chunk sides (of ``planned_axes``) and even its smallest
    # candidate's tasks exceed the memory limit
    smallest_chunks_exceed_limit: bool = False
    keep_budget: int = 0  # bytes the kept tensors may take, whole volume
    planned_axes: tuple[int, ...] = ()  # axes whose chunk side the planner chose

    def __post_init__(self):
        for name in ("stages", "notes", "barriers", "chunks", "planned_axes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def output_stage(self) -> Stage:
        return self.stages[-1]

    @property
    def n_tasks(self) -> int:
        return sum(s.n_tasks for s in self.stages) + sum(b.n_tasks for b in self.barriers)

    @property
    def input_bytes(self) -> int:
        return tensor_bytes(self.graph, self.graph.input)

    @property
    def largest_task(self) -> Stage | Barrier:
        """The stage or barrier whose tasks have the largest projected peak."""
        return max(self.stages + self.barriers, key=lambda part: part.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        """The largest projected peak of a task, of any stage or barrier."""
        return self.largest_task.peak_bytes

    @property
    def planned_macs(self) -> float:
        """The MACs every task together computes, halos and recomputation included."""
        return sum(s.macs for s in self.stages) + sum(b.macs for b in self.barriers)

    @property
    def compute_ratio(self) -> float:
        return self.planned_macs / max(self.model_macs, 1)

    def label(self, part: Stage | Barrier) -> str:
        """``stage 2 (conv_5)`` or ``barrier <where>, the statistics of conv_3,``."""
        if isinstance(part, Barrier):
            return (f"barrier {self.graph.globals[part.name].where}, the statistics of "
                    f"{part.program.output},")
        return f"stage {part.index} ({part.output})"

    def validate(self, memory_limit=None) -> "Plan":
        """Raise MemoryBudgetError, before anything runs, if a task's projected peak
        (of a stage or of a barrier's statistics) exceeds the limit; the message names
        that task and says which chunks or limit would fit."""
        limit = parse_bytes(memory_limit) or self.memory_limit
        worst = self.largest_task
        if worst.peak_bytes > limit:
            raise MemoryBudgetError(
                f"{self.label(worst)} needs {format_bytes(worst.peak_bytes)} per task with "
                f"chunks={self.chunks}, above memory_limit={format_bytes(limit)}; "
                f"{self._budget_fix(worst.peak_bytes)}", parameter='memory_limit')
        return self

    def _budget_fix(self, need: int) -> str:
        if not self.smallest_chunks_exceed_limit:
            return "pass smaller chunks or a larger memory_limit"
        if len(self.planned_axes) == SPATIAL:
            return (f"these are the smallest chunks the planner can align, so pass "
                    f"memory_limit >= {format_bytes(need)}")
        planned = ", ".join(AXIS_NAMES[a] for a in self.planned_axes)
        given = " and ".join(AXIS_NAMES[a] for a in range(SPATIAL) if a not in self.planned_axes)
        return (f"these are the smallest chunks the planner can align on {planned}, so pass "
                f"a smaller side on {given} or memory_limit >= {format_bytes(need)}")

    def __repr__(self) -> str:
        parts = [_plural(len(self.stages), "stage")]
        if self.barriers:
            parts.append(_plural(len(self.barriers), "barrier"))
        return (f"<volarray.Plan exact: {', '.join(parts)}, {_plural(self.n_tasks, 'task')}, chunks "
                f"{self.chunks}, peak {format_bytes(self.peak_bytes)}/task, compute "
                f"{self.compute_ratio:.2f}x, kept {format_bytes(self.kept_bytes)}>")

    def summary(self) -> list[str]:
        """The lines above the table: shapes, chunks, memory, compute, kept bytes."""
        g = self.graph
        inp, out = g.nodes[g.input], g.nodes[g.output]
        return [
            f"volarray plan: exact mode, {_plural(len(self.stages), 'stage')}, "
            f"{_plural(self.n_tasks, 'task')}",
            f"input  {inp.channels} x {inp.shape}   output {out.channels} x {out.shape}",
            f"chunks {self.chunks}   memory limit {format_bytes(self.memory_limit)} per task   "
            f"projected peak {format_bytes(self.peak_bytes)} per task",
            f"compute {self.compute_ratio:.2f}x one whole-volume forward "
            f"({self.model_macs / 1e9:.1f} GMAC); kept between stages "
            f"{format_bytes(self.kept_bytes)} ({self.kept_bytes / max(self.input_bytes, 1):.2f}x "
            f"the input) of a keep budget of {format_bytes(self.keep_budget)}; the rest is "
            "recomputed"]

    def _scale(self, name: str) -> str:
        scale = self.graph.nodes[name].scale
        return str(scale[0]) if len(set(scale)) == 1 else ",".join(str(x) for x in scale)

    def stage_row(self, s: Stage) -> tuple[str, ...]:
        """stage, output, scale, chunk, slab, tasks, halo, peak/task, ops, sources."""
        return (str(s.index), s.output, self._scale(s.output), str(s.chunk_shape),
                str(s.slab or "-"), str(s.n_tasks), str(s.halo), format_bytes(s.peak_bytes),
                str(len(s.program.order)), ", ".join(s.sources))

    def barrier_text(self, b: Barrier) -> str:
        how = (f"recomputed from {', '.join(b.program.sources)} ({len(b.program.order)} ops)"
               if b.recomputed else "read from the kept tensor")
        return (f"barrier {self.graph.globals[b.name].where}: statistics of {b.program.output} "
                f"over {b.n_tasks} chunks, {how}, +{b.macs / max(self.model_macs, 1):.2f}x "
                f"compute, peak {format_bytes(b.peak_bytes)}/task")

    def __str__(self) -> str:
        lines = ["  " * bool(i) + line for i, line in enumerate(self.summary())] + [
            "",
            f"  {'stage':>5}  {'output':<16} {'scale':<12} {'chunk':<16} {'slab':>5} {'tasks':>6} "
            f"{'halo':<12} {'peak/task':>10} {'ops':>4}  sources"]
        for s in self.stages:
            i, out, scale, chunk, slab, tasks, halo, peak, ops, src = self.stage_row(s)
            lines.append(f"  {i:>5}  {out[:16]:<16} {scale:<12} {chunk:<16} {slab:>5} "
                         f"{tasks:>6} {halo:<12} {peak:>10} {ops:>4}  {src}")
        lines += [""] * bool(self.barriers) + [f"  {self.barrier_text(b)}" for b in self.barriers]
        lines += [""] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip()

    def _repr_html_(self) -> str:
        esc = html.escape
        head = ("stage", "output", "scale", "chunk", "slab", "tasks", "halo", "peak/task",
                "ops", "sources")
        rows = ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in self.stage_row(s)) + "</tr>"
                for s in self.stages]
        rows += [f"<tr><td colspan=\"{len(head)}\">{esc(self.barrier_text(b))}</td></tr>"
                 for b in self.barriers]
        summary = "<br>".join(esc(line) for line in self.summary())
        notes = "".join(f"<li>{esc(n)}</li>" for n in self.notes)
        return (f"<div class=\"volarray-plan\"><p>{summary}</p><table><thead><tr>"
                + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>"
                + (f"<ul>{notes}</ul>" if notes else "") + "</div>")


# ------------------------------------------------------------------ what to keep
def keep_candidates(graph: Graph) -> list[str]:
    """Tensors worth keeping between stages: read by several ops, fed to a resolution
    change (skips, encoder/decoder levels) or reduced by a barrier. The output is
    always kept and is not a candidate."""
    consumers = graph.consumers()
    reduced = {g.source for g in (graph.globals or {}).values() if g.kind == "reduce"}
    out = []
    for name, node in graph.nodes.items():
        if node.op is None or name == graph.output:
            continue
        uses = consumers[name]
        if len(uses) >= 2 or name in reduced or any(
                graph.nodes[u].op.changes_resolution for u in uses):
            out.append(name)
    return out


def tensor_bytes(graph: Graph, name: str) -> int:
    node = graph.nodes[name]
    return node.channels * 4 * math.prod(node.shape)


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


def reductions(graph: Graph) -> list:
    return [g for g in (graph.globals or {}).values() if g.kind == "reduce"]


class Compute:
    """The MACs a kept set costs on one task grid: every stage (each kept tensor
    computed from its nearest kept ancestors, halos included) and every barrier's
    statistics pass. Programs already costed are remembered, so trying one more
    kept tensor costs only the stages it changes."""

    def __init__(self, graph: Graph, base):
        self.graph, self.base, self.memo, self.programs = graph, base, {}, {}

    def program(self, name: str, avail: frozenset) -> TileProgram:
        key = (name, avail)
        if key not in self.programs:
            self.programs[key] = program_for(self.graph, name, set(avail))
        return self.programs[key]

    def macs_of(self, prog: TileProgram) -> float:
        key = (prog.output, prog.sources)
        if key not in self.memo:
            node = self.graph.nodes[prog.output]
            probe = Stage(-1, prog, stage_bounds(self.base, node.shape, node.scale))
            self.memo[key] = cost_stage(self.graph, probe)[0].macs
        return self.memo[key]

    def __call__(self, kept: set[str]) -> float:
        g = self.graph
        avail = frozenset(kept | {g.input})
        total = sum(self.macs_of(self.program(n, avail - {n})) for n in kept)
        return total + sum(self.macs_of(self.program(r.source, avail)) for r in reductions(g))


def keep_order(graph: Graph, budget: float, compute: "Compute") -> list[str]:
    """The tensors worth keeping, in the order a greedy rematerialization adds them:
    each time the one that saves the most compute per byte kept while the whole-volume
    bytes of all fit ``budget`` (keep or recompute decided by cost, not by rule, in the
    spirit of Checkmate's), costed by ``compute`` on its task grid."""
    sizes = {c: tensor_bytes(graph, c) for c in keep_candidates(graph)}
    kept, order, spent = {graph.output}, [], 0
    current = compute(kept)
    floor = 1e-3 * current  # a saving below this is not worth a stage
    while budget > 0:
        best, best_score = None, 0.0
        for c, size in sizes.items():
            if c in kept or spent + size > budget:
                continue
            saving = current - compute(kept | {c})
            if saving > floor and saving / size > best_score:
                best, best_score = c, saving / size
        if best is None:
            break
        kept.add(best)
        order.append(best)
        spent += sizes[best]
        current = compute(kept)
    return order


def budget_ladder(budget: float, input_bytes: int) -> list[float]:
    """``budget`` and the powers of two times the input's bytes below it (from an
    eighth): the budgets whose greedy kept sets `choose_kept` compares."""
    ladder, b = [budget], input_bytes / 8
    while b < budget:
        ladder.append(b)
        b *= 2
    return ladder


def choose_kept(planner: "Planner", budget: float, candidates) -> tuple[list[str], "Grid"]:
    """The output plus the kept tensors that cost the least compute, with their grid.
    Kept tensors cut the network into stages; the others are recomputed, halo
    included, by every stage and barrier that reads them. The greedy order is costed
    on one grid, but a kept tensor's stage may need smaller tasks (its sources and
    output must fit a task's I/O bytes), and smaller tasks recompute more halo: so each
    prefix of the greedy orders of ``budget`` and of the smaller budgets of
    `budget_ladder` is laid out on its own grid and the cheapest set whose tasks fit is
    chosen (so that 4x the input never costs more compute than 1x or 2x)."""
    graph = planner.graph
    nothing = planner.grid([graph.output], candidates)
    compute = Compute(graph, nothing.base)
    sets = set()
    for b in budget_ladder(budget, tensor_bytes(graph, graph.input)):
        order = keep_order(graph, b, compute)
        sets.update(frozenset(order[:k]) for k in range(1, len(order) + 1))
    # fewer kept tensors first, replaced only to fit or to save
    best = ([graph.output], nothing)
    for chosen in sorted(sets, key=lambda c: (len(c), sorted(c))):
        kept = [n for n in graph.nodes if n in chosen or n == graph.output]
        grid = planner.grid(kept, candidates)
        if (best[1].too_big and not grid.too_big) or (
                grid.too_big == best[1].too_big
                and grid.layout.macs < (1 - 1e-3) * best[1].layout.macs):
            best = (kept, grid)
    return best


def parse_keep(keep, default: int, input_bytes: int) -> int:
    """The keep budget in bytes: None for ``default``, bytes or '40GB', or a multiple
    of the input's bytes as '2x' (0 keeps nothing but the output)."""
    if keep is None:
        return default
    if isinstance(keep, str) and keep.strip().lower().endswith("x"):
        try:
            factor = float(keep.strip()[:-1])
        except ValueError:
            factor = -1.0
        if not (math.isfinite(factor) and factor >= 0):
            raise InputError(f"keep={keep!r} is not a multiple of the input; pass e.g. '2x'", parameter='keep')
        return int(factor * input_bytes)
    if not isinstance(keep, bool) and keep in (0, "0"):
        return 0
    try:
        return parse_bytes(keep)
    except InputError:
        raise InputError(f"keep={keep!r} is not a budget; pass bytes ('40GB'), a multiple of "
                         "the input ('2x') or 0", parameter='keep') from None


def default_keep(graph: Graph, spill: bool) -> int:
    """The input's own bytes. A lazy result (``spill=False``) has nowhere to put kept
    tensors but memory, and dask may hold every chunk of one until its last reader ran
    (a barrier always does, until the statistics are known), so it keeps at most an
    eighth of the memory it will run in and recomputes the rest."""
    n = tensor_bytes(graph, graph.input)
    return n if spill else int(min(n, run_memory() / 8))


def run_memory() -> int:
    """The memory a lazy result will run in: the workers' of the default
    dask.distributed client when there is one, else this machine's."""
    try:
        from distributed import default_client
        workers = default_client().scheduler_info().get("workers", {})
    except (ImportError, ValueError):
        workers = {}
    total = sum(w.get("memory_limit") or 0 for w in workers.values())
    return int(total) or psutil.virtual_memory().total



# ------------------------------------------------------------------ task grid
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
    costed = replace(
        stage, macs=sum(graph.nodes[n].op.macs * math.prod(sums[n]) for n in prog.order),
        peak_bytes=prog.peak_bytes(shapes), halo=tuple(halo), slab=None,
        io_bytes=sum(graph.nodes[n].channels * 4 * math.prod(maxs[n]) for n in held))
    return costed, shapes


def sweep_bytes(graph: Graph, stage: Stage, shapes: dict, rows: int) -> tuple[int, int]:
    """A task swept in slabs of ``rows``: the bytes of one interior slab's tensors
    (its working set), and the task's projected peak: its sources and output, that
    slab, and the rows each node holds for the next slab (the halo it reads)."""
    prog = stage.program
    n = graph.nodes[prog.output].shape[0]
    k = max(0, n // rows // 2 - 1)
    a, b = Interval(k * rows, min(n, (k + 1) * rows)), Interval(
        min(n, (k + 1) * rows), min(n, (k + 2) * rows))
    ra, _ = prog.requirements_1d(0, a)
    rb, _ = prog.requirements_1d(0, b)
    held = {}  # bytes of the rows a node holds for the next slab
    for m, iv in ra.items():
        if m in prog.sources or m not in rb:
            continue
        overlap = max(0, iv.hi - rb[m].lo)
        held[m] = graph.nodes[m].channels * 4 * overlap * math.prod(shapes[m][1:])
    slab_shapes = {m: (len(ra[m]),) + s[1:] for m, s in shapes.items() if m in ra}
    return (prog.peak_bytes(slab_shapes),
            stage.io_bytes + prog.peak_bytes(slab_shapes, held=held))


# Thin slabs cost time (per-slab overheads, less work per call): FaultSeg3D's single
# 128^3 task swept in 8-row slabs ran 1.7x slower than whole, for 17% less memory. A task
# is swept only where that holds at most this fraction of its whole-region peak.
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
    if peak > SWEEP_SAVING * stage.peak_bytes:
        return stage  # sweeping would save too little memory for its time
    rows = unit
    while rows * 2 < depth:
        slab, thicker = sweep_bytes(graph, stage, shapes, rows * 2)
        if slab > target or thicker > limit:
            break
        rows, peak = rows * 2, thicker
    return replace(stage, slab=rows, peak_bytes=peak)


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

    @classmethod
    def for_device(cls, graph: Graph, memory_limit, device: str) -> "Planner":
        limit = parse_bytes(memory_limit) or default_memory_limit()
        on_cpu = device == "cpu"
        return cls(graph, limit, min(limit, CPU_TARGET_TILE_BYTES) if on_cpu else limit,
                   min(limit, TASK_IO_BYTES) if on_cpu else limit, alignment(graph))

    def stage(self, index: int, prog: TileProgram, base, min_side: int,
              holds_output: bool = True) -> Stage:
        """The costed stage of ``prog`` on grid ``base``, swept in the thickest slab
        that fits."""
        node = self.graph.nodes[prog.output]
        bounds = stage_bounds(base, node.shape, node.scale, min_side)
        st, shapes = cost_stage(self.graph, Stage(index, prog, bounds), holds_output)
        unit = max(1, int(self.align[0] * node.scale[0]))
        return choose_slab(self.graph, st, shapes, self.tile_target, unit, self.limit)

    def stages(self, kept, base) -> tuple[Stage, ...]:
        """One stage per kept tensor, from its nearest kept ancestors; coarse levels
        merge small chunks where that fits."""
        avail = set(kept) | {self.graph.input}
        programs = [program_for(self.graph, n, avail - {n}) for n in kept]
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
            probe = self.statistics_tasks(program_for(self.graph, g.source, avail), base)
            out.append(Barrier(g.name, probe.program, probe.bounds, macs=probe.macs,
                               slab=probe.slab, peak_bytes=probe.peak_bytes))
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
        return Layout(self.stages(kept, base), self.barriers(kept, base))

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


def model_macs(graph: Graph) -> float:
    """The MACs of one whole-volume forward."""
    return sum(n.op.macs * math.prod(n.shape) for n in graph.nodes.values() if n.op)


def every_worth_keeping(graph: Graph) -> list[str]:
    """Every keep candidate and the output, in graph order."""
    wanted = set(keep_candidates(graph)) | {graph.output}
    return [n for n in graph.nodes if n in wanted]


def keep_more_to_fit(planner: Planner, kept: list[str], grid: Grid, candidates,
                     keep) -> tuple[list[str], Grid, list[str]]:
    """Past the default keep budget (``keep=None``), rather than refuse: where no
    grid's tasks fit, keeping every tensor worth keeping cuts the network into
    shallow stages with small halos. The kept set, its grid and a note."""
    if not (grid.too_big and keep is None):
        return kept, grid, []
    every = every_worth_keeping(planner.graph)
    trial = planner.grid(every, candidates)
    if trial.too_big:
        return kept, grid, []
    return every, trial, [f"keeps every tensor worth keeping, past the default keep budget, "
                          f"so that tasks fit memory_limit={format_bytes(planner.limit)}"]


def chunks_note(planner: Planner, grid: Grid, planned: tuple[int, ...]) -> str:
    """How the planner chose the chunk sides of ``planned`` axes."""
    which = "" if len(planned) == SPATIAL else \
        " on " + ", ".join(AXIS_NAMES[a] for a in planned) + " (the others given)"
    return (f"chunks {grid.base} chosen{which}: the largest even split aligned to "
            f"{planner.align} whose tasks read and write at most "
            f"{format_bytes(planner.io_target)} and fit {format_bytes(planner.limit)}"
            + (f", grown to keep the graph under {MAX_TASKS:,} tasks" if grid.grown else ""))


def make_plan(graph: Graph, chunks=None, memory_limit=None, device: str = "cpu",
              keep=None, spill: bool = False) -> Plan:
    """The plan of an exact run. ``chunks``: as `coerce_chunks` takes or returns it
    (None on an axis: the planner's choice); ``keep``: the budget of kept tensors
    (see `parse_keep`; by default `default_keep`); ``spill``: they may go to scratch."""
    planner = Planner.for_device(graph, memory_limit, device)
    shape = graph.nodes[graph.input].shape
    given = coerce_chunks(chunks, shape)
    step = max(max(planner.align), 8)  # the smallest chunk side worth suggesting
    estimate = warn_of_tiny_chunks(shape, given, step)
    planned = tuple(range(SPATIAL)) if given is None else \
        tuple(a for a, c in enumerate(given) if c is None)
    budget = parse_keep(keep, default_keep(graph, spill), tensor_bytes(graph, graph.input))
    candidates = candidate_chunks(shape, planner.align, given)
    kept, grid = choose_kept(planner, budget, candidates)
    kept, grid, notes = keep_more_to_fit(planner, kept, grid, candidates, keep)
    if planned:
        notes.insert(0, chunks_note(planner, grid, planned))
    stages = grid.layout.stages
    plan = Plan(graph, stages, grid.base, planner.limit, model_macs(graph),
                kept_bytes=sum(tensor_bytes(graph, s.output) for s in stages[:-1]),
                notes=tuple(notes), barriers=grid.layout.barriers,
                smallest_chunks_exceed_limit=grid.too_big and bool(planned),
                keep_budget=budget, planned_axes=planned)
    if estimate <= TASK_WARNING < plan.n_tasks:  # not foreseen: stages and barriers
        warn_of_many_tasks(plan.n_tasks, f"the plan of chunks={plan.chunks} has "
                           f"{plan.n_tasks:,} tasks", fewer_chunks(shape, step))
    return plan
