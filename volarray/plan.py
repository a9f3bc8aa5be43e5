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

import math
from dataclasses import dataclass, field
from fractions import Fraction

import psutil

from .errors import InputError, MemoryBudgetError
from .geometry import Interval, chunk_bounds, intervals
from .program import TileProgram
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
    slab: int | None = None  # as Stage.slab

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
    keep_budget: int = 0  # bytes the kept tensors may take, whole volume

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
            f"{_fmt_bytes(self.kept_bytes)} ({self.kept_bytes / max(self.input_bytes, 1):.2f}x "
            f"the input) of a keep budget of {_fmt_bytes(self.keep_budget)}; the rest is "
            "recomputed",
            "",
            f"  {'stage':>5}  {'output':<16} {'scale':<12} {'chunk':<16} {'slab':>5} {'tasks':>6} "
            f"{'halo':<12} {'peak/task':>10} {'ops':>4}  sources",
        ]
        for s in self.stages:
            node = g.nodes[s.output]
            scale = ",".join(str(x) for x in node.scale)
            if len(set(node.scale)) == 1:
                scale = str(node.scale[0])
            lines.append(
                f"  {s.index:>5}  {s.output[:16]:<16} {scale:<12} "
                f"{str(s.chunk_shape):<16} {s.slab or '-':>5} {s.n_tasks:>6} {str(s.halo):<12} "
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
            st = Stage(-1, prog, stage_bounds(self.base, node.shape, node.scale))
            cost_stage(self.graph, st)
            self.memo[key] = st.macs
        return self.memo[key]

    def __call__(self, kept: set[str]) -> float:
        g = self.graph
        avail = frozenset(kept | {g.input})
        total = sum(self.macs_of(self.program(n, avail - {n})) for n in kept)
        return total + sum(self.macs_of(self.program(r.source, avail)) for r in reductions(g))


def choose_kept(graph: Graph, budget: float, base) -> list[str]:
    """The output, plus the tensors that save the most compute per byte kept while
    their whole-volume bytes fit ``budget`` (greedy rematerialization, in the spirit
    of Checkmate's: keep or recompute, decided by cost, not by rule). Kept tensors
    cut the network into stages; the others are recomputed, halo included, by every
    stage and barrier that reads them."""
    kept = {graph.output}
    sizes = {c: tensor_bytes(graph, c) for c in keep_candidates(graph)}
    if budget <= 0 or not sizes:
        return [graph.output]
    compute, spent = Compute(graph, base), 0
    current = compute(kept)
    floor = 1e-3 * current  # a saving below this is not worth a stage
    while True:
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
        spent += sizes[best]
        current = compute(kept)
    return [n for n in graph.nodes if n in kept]


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
            raise InputError(f"keep={keep!r} is not a multiple of the input; pass e.g. '2x'")
        return int(factor * input_bytes)
    if not isinstance(keep, bool) and keep in (0, "0"):
        return 0
    try:
        return parse_bytes(keep)
    except InputError:
        raise InputError(f"keep={keep!r} is not a budget; pass bytes ('40GB'), a multiple of "
                         "the input ('2x') or 0") from None


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


def cost_stage(graph: Graph, stage: Stage) -> dict:
    """Fill the stage's computed MACs, halo, I/O bytes and whole-task peak (per-axis
    algebra); return each node's largest region shape. A task sweeping its region in
    slabs computes each halo once, so its MACs are those of one whole-region tile."""
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
    stage.macs = sum(graph.nodes[n].op.macs * math.prod(sums[n]) for n in prog.order)
    stage.peak_bytes = prog.peak_bytes(shapes)
    stage.io_bytes = sum(graph.nodes[n].channels * 4 * math.prod(maxs[n])
                         for n in set(prog.sources) | {prog.output})
    stage.halo = tuple(halo)
    stage.slab = None
    return shapes


def sweep_peak(graph: Graph, stage: Stage, shapes: dict, rows: int) -> int:
    """Projected peak of a task swept in slabs of ``rows``: its sources and output,
    one interior slab's tensors, and the rows each node keeps for the next slab."""
    prog = stage.program
    n = graph.nodes[prog.output].shape[0]
    k = max(0, n // rows // 2 - 1)
    a, b = Interval(k * rows, min(n, (k + 1) * rows)), Interval(
        min(n, (k + 1) * rows), min(n, (k + 2) * rows))
    ra, _ = prog.requirements_1d(0, a)
    rb, _ = prog.requirements_1d(0, b)
    slab = {m: (len(ra[m]),) + s[1:] for m, s in shapes.items() if m in ra}
    held = 0  # a node the next slab reads keeps a store of its rows plus a slab's room
    for m, iv in ra.items():
        if m in prog.sources or m not in rb:
            continue
        rows = len(iv) + max(0, rb[m].hi - iv.hi)
        held += graph.nodes[m].channels * 4 * rows * math.prod(shapes[m][1:])
    return stage.io_bytes + prog.peak_bytes(slab) + held


def choose_slab(graph: Graph, stage: Stage, shapes: dict, target: float, unit: int) -> None:
    """The thickest slab (a multiple of ``unit`` rows, or the whole region) whose sweep
    fits ``target``; the thinnest if none does."""
    depth = stage.chunk_shape[0]
    if stage.peak_bytes <= target or depth <= unit or not stage.program.order:
        return
    if sweep_peak(graph, stage, shapes, unit) >= stage.peak_bytes:
        return  # sweeping would hold more than the whole region
    rows = unit
    while rows * 2 < depth and sweep_peak(graph, stage, shapes, rows * 2) <= target:
        rows *= 2
    stage.slab, stage.peak_bytes = rows, sweep_peak(graph, stage, shapes, rows)


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


# On CPU, tiles of ~100-200 MB run fastest (caches; FaultSeg3D at 128^3-192^3 was
# 10-25% slower with 400 MB tiles here): a task sweeps its region in slabs that fit.
CPU_TARGET_TILE_BYTES = 200e6
# A task's sources and output (what it reads and writes; with the chunks dask holds
# for it, several times this) stay below this on CPU: the same task size at every
# volume size, so memory does not grow with the volume.
TASK_IO_BYTES = 64e6
# Tasks grow past that where the graph would otherwise hold more than this many.
MAX_TASKS = 50_000


def plan_tasks(stages: list[Stage], barriers: list[Barrier]) -> int:
    return sum(s.n_tasks for s in stages) + sum(b.n_tasks for b in barriers)


def make_plan(graph: Graph, chunks=None, memory_limit=None, device: str = "cpu",
              keep=None, spill: bool = False) -> Plan:
    """The plan of an exact run. ``keep``: the budget of kept tensors (see
    `parse_keep`; by default `default_keep`); ``spill``: they may go to scratch."""
    limit = parse_bytes(memory_limit) or default_memory_limit()
    shape = graph.nodes[graph.input].shape
    input_bytes = tensor_bytes(graph, graph.input)
    budget = parse_keep(keep, default_keep(graph, spill), input_bytes)
    align = alignment(graph)
    tile_target = limit if device != "cpu" else min(limit, CPU_TARGET_TILE_BYTES)
    io_target = limit if device != "cpu" else min(limit, TASK_IO_BYTES)
    model_macs = sum(n.op.macs * math.prod(n.shape) for n in graph.nodes.values() if n.op)
    reduced = reductions(graph)

    def layout(kept, base):
        """Stages and barriers of ``kept`` on grid ``base``; coarse levels merge small
        chunks where that fits; each task sweeps in the thickest slab that fits."""
        avail = set(kept) | {graph.input}
        programs = [program_for(graph, n, avail - {n}) for n in kept]
        for min_side in (MIN_TILE_SIDE, 1):
            stages = []
            for i, prog in enumerate(programs):
                node = graph.nodes[prog.output]
                st = Stage(i, prog, stage_bounds(base, node.shape, node.scale, min_side))
                shapes = cost_stage(graph, st)
                unit = max(1, int(align[0] * node.scale[0]))
                choose_slab(graph, st, shapes, tile_target, unit)
                stages.append(st)
            if max(s.peak_bytes for s in stages) <= limit:
                break
        barriers = []
        for g in reduced:
            prog = program_for(graph, g.source, avail)
            node = graph.nodes[g.source]
            b = Barrier(g.name, prog, stage_bounds(base, node.shape, node.scale))
            probe = Stage(-1, prog, b.bounds)
            shapes = cost_stage(graph, probe)
            choose_slab(graph, probe, shapes, tile_target, max(1, int(align[0] * node.scale[0])))
            b.macs, b.slab = probe.macs, probe.slab
            barriers.append(b)
        return stages, barriers

    def fits(stages):
        return max(s.peak_bytes for s in stages) <= limit and \
            max(s.io_bytes for s in stages) <= io_target

    candidates = candidate_chunks(shape, align) if chunks is None else [tuple(chunks)]

    def grid_for(kept):
        """The largest candidate grid whose tasks fit (the smallest if none does), grown
        where the graph would be too large for the scheduler."""
        chosen = None
        for i, cand in enumerate(candidates):  # largest first
            stages, barriers = layout(kept, cand)
            if fits(stages):
                chosen = i
                break
        too_big = chosen is None and max(s.peak_bytes for s in stages) > limit
        if chosen is None:
            chosen = len(candidates) - 1
        grown = False
        while chosen > 0 and plan_tasks(stages, barriers) > MAX_TASKS:
            bigger = layout(kept, candidates[chosen - 1])
            if max(s.peak_bytes for s in bigger[0]) > limit:
                break
            chosen, grown = chosen - 1, True
            stages, barriers = bigger
        return candidates[chosen], stages, barriers, grown, too_big

    # the grid for keeping nothing, what to keep on it, then the grid for that
    base = grid_for([graph.output])[0]
    kept = choose_kept(graph, budget, base)
    base, stages, barriers, grown, too_big = grid_for(kept)
    notes = []
    if too_big and keep is None:
        # past the default budget, rather than refuse: keeping every tensor worth
        # keeping cuts the network into shallow stages with small halos
        every = [n for n in graph.nodes if n in set(keep_candidates(graph)) | {graph.output}]
        trial = grid_for(every)
        if not trial[-1]:
            kept, (base, stages, barriers, grown, too_big) = every, trial
            notes.append(f"keeps every tensor worth keeping, past the default keep budget, "
                         f"so that tasks fit memory_limit={_fmt_bytes(limit)}")
    if chunks is None:
        notes.insert(0, f"chunks {base} chosen: the largest even split aligned to {align} "
                        f"whose tasks read and write at most {_fmt_bytes(io_target)} and fit "
                        f"{_fmt_bytes(limit)}" + (f", grown to keep the graph under "
                                                   f"{MAX_TASKS:,} tasks" if grown else ""))
    smallest_too_big = too_big and chunks is None
    chunks = base
    kept_bytes = sum(tensor_bytes(graph, s.output) for s in stages[:-1])
    return Plan(graph, stages, tuple(chunks), limit, model_macs, kept_bytes, notes, barriers,
                chunks_chosen=smallest_too_big, keep_budget=budget)
