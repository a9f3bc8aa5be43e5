"""What to keep between stages: rematerialization under a keep budget.

The planner keeps some tensors between stages and recomputes the rest. From keeping
every candidate (about one forward's compute) it drops, one at a time, the tensor whose
recomputation costs the fewest MACs per byte it frees, down to keeping nothing (a
norm-free network then runs depth-first, each task from the input with its receptive
field's halo); the sets of that sequence that fit the budget (and, for short sequences,
those of the greedy from the bottom) are each laid out on their own grid, and the
fastest that fits is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import format_bytes, parse_bytes, run_memory
from .costing import (Stage, cost_stage, estimated_macs, nearest_kept, reductions,
                      stage_bounds)
from .errors import InputError
from .graph import Graph, tensor_bytes
from .grids import Grid, Planner
from .program import TileProgram


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


class Compute:
    """The MACs of kept sets on one task grid: every stage (each kept tensor computed
    from its nearest kept ancestors, halos included) and every barrier's statistics
    pass. A stage is costed once per output and sources, so trying a change to a kept
    set costs only the stages it changes: by `cost_stage` (``exact``), or estimated by
    `estimated_macs` (within 7% of it on the reference models, at a fraction of its
    time: for the thousands of stages of a norm-heavy network; FaultSeg3D's kept sets
    differ by less than that, 1.35x against 1.37x at 256^3)."""

    def __init__(self, graph: Graph, base, exact: bool = True):
        self.graph, self.base, self.exact, self.memo = graph, base, exact, {}
        self.index = graph.order

    def sources(self, name: str, avail) -> frozenset:
        """The nearest ancestors of ``name`` in ``avail`` (itself, if it is there)."""
        return frozenset(nearest_kept(self.graph, name, avail))

    def macs(self, name: str, sources: frozenset) -> float:
        """The MACs of the stage computing ``name`` from ``sources`` (0: it reads it)."""
        if name in sources:
            return 0.0
        key = (name, sources)
        if key not in self.memo:
            node = self.graph.nodes[name]
            bounds = stage_bounds(self.base, node.shape, node.scale)
            if self.exact:
                prog = TileProgram(self.graph, name, tuple(sorted(sources, key=self.index.get)))
                self.memo[key] = cost_stage(self.graph, Stage(-1, prog, bounds))[0].macs
            else:
                self.memo[key] = estimated_macs(self.graph, name, sources, bounds, self.index)
        return self.memo[key]

    def __call__(self, kept) -> float:
        g = self.graph
        avail = frozenset(set(kept) | {g.output, g.input})
        total = sum(self.macs(n, self.sources(n, avail - {n})) for n in avail - {g.input})
        return total + sum(self.macs(r.source, self.sources(r.source, avail))
                           for r in reductions(g))


@dataclass(frozen=True)
class KeptSet:
    """One kept set of a `keep_sequence`: its tensors (the output left out), their
    whole-volume bytes and its MACs on the sequence's grid."""

    names: frozenset
    bytes: int
    macs: float


def keep_sequence(graph: Graph, compute: Compute):
    """Nested kept sets, from every tensor worth keeping down to the output alone
    (yielded one by one, as they are needed): each drops the kept tensor whose
    recomputation costs the fewest MACs per byte it frees (keep or recompute decided
    by cost, not by rule, in the spirit of Checkmate's; greedy, from the top, so that a
    change re-costs only the stages that read the tensor dropped). The sequence stops
    where a set computes more than `SLOW_REFUSED` times the least seen: such plans are
    refused, and the stages of norm-heavy networks grow quadratically there (FaultSSL's
    274 statistics barriers, each recomputing the network above it).

    Each stage and barrier is a target: a (node, sources) pair; dropping ``c`` merges
    c's sources into those of every target that read ``c``."""
    g = compute.graph
    sizes = {c: tensor_bytes(g, c) for c in keep_candidates(g)}
    avail = frozenset(sizes) | {g.output, g.input}
    targets = {("stage", n): (n, compute.sources(n, avail - {n})) for n in avail - {g.input}}
    targets.update({("barrier", r.name): (r.source, compute.sources(r.source, avail))
                    for r in reductions(g)})
    current = sum(compute.macs(n, s) for n, s in targets.values())
    kept = set(sizes)
    last = KeptSet(frozenset(kept), sum(sizes.values()), current)
    yield last
    least = current

    def readers(c):
        return [k for k, (_, s) in targets.items() if c in s]

    def drop_cost(c) -> float:
        own = targets[("stage", c)][1]
        cost = -compute.macs(c, own)
        for k in readers(c):
            n, s = targets[k]
            cost += compute.macs(n, (s - {c}) | own) - compute.macs(n, s)
        return cost

    # A drop makes the costs of dropping its neighbours stale; they may fall as well as
    # rise (FaultSeg3D: dropping the bottleneck makes dropping enc3 free). A short
    # sequence recomputes them all before the next pick; a long one (hundreds of
    # barriers, where that costs most of the planning) only the least, until the least
    # is fresh: a stale cost that fell may then be picked later than it should be.
    costs = {c: drop_cost(c) for c in kept}
    stale = set()
    order = compute.index
    eager = len(kept) <= LAID_OUT

    def score(c):
        return (costs[c] / max(sizes[c], 1), order[c])
    while kept:
        if eager:
            costs.update({x: drop_cost(x) for x in stale})
            stale.clear()
        while True:
            c = min(kept, key=score)
            if c not in stale:
                break
            costs[c] = drop_cost(c)
            stale.discard(c)
        own = targets.pop(("stage", c))[1]
        changed = readers(c)
        for k in changed:
            n, s = targets[k]
            targets[k] = (n, (s - {c}) | own)
        kept.discard(c)
        current += costs.pop(c)
        least = min(least, current)
        last = KeptSet(frozenset(kept), last.bytes - sizes[c], current)
        yield last
        if current > SLOW_REFUSED * least:
            return
        # the drop costs that read a changed target: its sources', and its own
        stale |= {x for k in changed for x in targets[k][1]} | {
            targets[k][0] for k in changed if k[0] == "stage"}
        stale &= kept


def keep_order(graph: Graph, budget: float, compute: "Compute") -> list[str]:
    """The tensors worth keeping within ``budget``, in the order a greedy
    rematerialization from the bottom adds them: each time the one that saves the most
    compute per byte kept while the whole-volume bytes of all fit ``budget``. Where
    the budget is tight, it finds the few small tensors that save much, which
    `keep_sequence`, from the top, may drop on its way down; it tries every candidate
    at every step, so only short sequences run it."""
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


def budget_ladder(budget: float, input_bytes: int, worth: float = math.inf) -> list[float]:
    """``budget`` and the powers of two times the input's bytes below it (from an
    eighth): budgets whose kept sets `choose_kept` lays out. Past ``worth`` (the bytes
    of every tensor worth keeping) a budget keeps no more."""
    budget = min(budget, worth)
    ladder, b = [budget], input_bytes / 8
    while b < budget:
        ladder.append(b)
        b *= 2
    return ladder


# Kept sets of a long sequence laid out on their own grids per plan: about this many.
LAID_OUT = 24
# A kept set of a long sequence estimated at more than this many times the fastest set
# within the budget is not laid out: projected time is mostly compute, and its fewer
# tasks would have to save more than a tenth of it (FaultSSL: 1.00x-1.10x spans 438 to
# about 265 kept tensors; following the sequence to 1.25x doubled its planning time).
WORTH_LAYING_OUT = 1.1


def thinned(sets: list[KeptSet], budget: float, input_bytes: int) -> list[KeptSet]:
    """Every set of a short list (of a sequence, largest first); of a long one (a
    norm-heavy network's hundreds of tensors), the first that fits each budget of
    `budget_ladder` and those of 1, 2, 3, 4, 6, 9, ... tensors, so that planning stays a
    few layouts."""
    if len(sets) <= LAID_OUT:
        return sets
    chosen = {id(sets[0]): sets[0]}
    for b in budget_ladder(budget, input_bytes, sets[0].bytes):
        first = next((s for s in sets if s.bytes <= b), None)
        if first is not None:
            chosen[id(first)] = first
    counts, k = set(), 1.0
    while k <= len(sets[0].names):
        counts.add(int(k))
        k = max(k + 1, k * 1.5)
    chosen.update({id(s): s for s in sets if len(s.names) in counts})
    return list(chosen.values())


def better(planner: "Planner", grid: "Grid", best: "Grid") -> bool:
    """``grid`` fits where ``best`` does not, or fits as well and is projected faster
    (by more than 0.1%: fewer kept tensors win a tie); where neither fits, ``grid``
    comes closer (its refusal names the smallest memory limit that works)."""
    if best is None:
        return True
    if best.too_big != grid.too_big:
        return best.too_big
    if grid.too_big:
        return grid.layout.peak_bytes < best.layout.peak_bytes
    return planner.seconds(grid.layout) < (1 - 1e-3) * planner.seconds(best.layout)


class KeepSearch:
    """The `keep_sequence` of one planner's graph over its candidate grids, followed as
    far as the budgets tried need, and the layout of nothing kept: each made once for
    every budget a plan tries."""

    def __init__(self, planner: "Planner", candidates):
        self.planner, self.candidates, self._nothing = planner, candidates, None
        graph = planner.graph
        # costed on the grid of nothing kept (the smallest tasks, the most halo), or
        # on the user's chunks without laying that out
        base = candidates[0] if len(candidates) == 1 else self.nothing.base
        # a short sequence is costed exactly; a long one (a norm-heavy network's) estimated
        self.compute = Compute(graph, base, exact=len(keep_candidates(graph)) <= LAID_OUT)
        self._steps = keep_sequence(graph, self.compute)
        self.sequence = [next(self._steps)]

    @property
    def nothing(self) -> "Grid":
        if self._nothing is None:
            self._nothing = self.planner.grid([self.planner.graph.output], self.candidates)
        return self._nothing

    def seconds(self, kept: KeptSet) -> float:
        """A kept set's time estimated before its layout: its MACs at the device's
        rate, and its kept bytes written once and read once at the storage's."""
        rates = self.planner.rates
        if rates is None:
            return kept.macs
        return kept.macs / rates.macs_per_s + 2 * kept.bytes / rates.bytes_per_s

    def within(self, budget: float) -> list[KeptSet]:
        """The kept sets worth laying out within ``budget``: of a short sequence, every
        set that fits and the prefixes of `keep_order` for each budget of
        `budget_ladder`; of a long one, the `thinned` sets that fit and are estimated
        within `WORTH_LAYING_OUT` times the fastest of them (the sequence followed
        until one fits and they compute more)."""
        if budget <= 0:
            return [s for s in self.sequence if not s.names] or [
                KeptSet(frozenset(), 0, math.inf)]
        if len(self.sequence[0].names) <= LAID_OUT:  # a short sequence: all of it,
            self.sequence.extend(self._steps)  # and the bottom-up greedy's sets
            graph, out = self.planner.graph, [s for s in self.sequence if s.bytes <= budget]
            sizes = {c: tensor_bytes(graph, c) for c in self.sequence[0].names}
            for b in budget_ladder(budget, tensor_bytes(graph, graph.input),
                                   self.sequence[0].bytes):
                order = keep_order(graph, b, self.compute)
                out += [KeptSet(frozenset(order[:k]), sum(sizes[c] for c in order[:k]), 0.0)
                        for k in range(1, len(order) + 1)]
            return list({s.names: s for s in out}.values())
        while True:
            fits = [s for s in self.sequence if s.bytes <= budget]
            if fits and self.sequence[-1].macs > WORTH_LAYING_OUT * min(s.macs for s in fits) \
                    and self.seconds(self.sequence[-1]) > WORTH_LAYING_OUT * min(
                        self.seconds(s) for s in fits):
                break
            step = next(self._steps, None)
            if step is None:
                break
            self.sequence.append(step)
        least = min((self.seconds(s) for s in fits), default=math.inf)
        return thinned([s for s in fits if self.seconds(s) <= WORTH_LAYING_OUT * least],
                       budget, tensor_bytes(self.planner.graph, self.planner.graph.input))

    def slow_within(self, budget: float) -> bool:
        """Whether even keeping every tensor that fits ``budget`` on its own (more than
        ``budget`` may hold) computes more than `SLOW_NOTE` times keeping every one: a
        cheap test, before following the sequence down to ``budget``."""
        g = self.planner.graph
        alone = {c for c in keep_candidates(g) if tensor_bytes(g, c) <= budget}
        return self.compute(alone) > SLOW_NOTE * self.sequence[0].macs


def choose_kept(planner: "Planner", budget: float,
                search: KeepSearch) -> tuple[list[str], "Grid"]:
    """The output plus the kept tensors whose plan is projected fastest, with their
    grid (MACs at the device's rate, bytes read and written at the storage's, and
    each task's overhead: `Planner.seconds`).
    Kept tensors cut the network into stages; the others are recomputed, halo
    included, by every stage and barrier that reads them. The `keep_sequence` is costed
    on one grid, but a kept tensor's stage may need smaller tasks (its sources and
    output must fit a task's I/O bytes), and smaller tasks recompute more halo: so the
    sets `KeepSearch.within` ``budget`` are each laid out on their own grid and
    the fastest set whose tasks fit is chosen (so that 4x the input never costs more
    than 1x or 2x). The output alone is laid out where it is among those sets, where
    none fits the budget, or where no set's tasks fit and its might (it is the costliest
    plan of a norm-heavy network)."""
    graph, candidates = planner.graph, search.candidates
    sets = search.within(budget)
    best = ([graph.output], search.nothing if not sets else None)
    # fewer kept tensors first, replaced only to fit or to save
    for chosen in sorted(sets, key=lambda c: (len(c.names), sorted(c.names))):
        kept = [n for n in graph.nodes if n in chosen.names or n == graph.output]
        grid = search.nothing if not chosen.names else planner.grid(kept, candidates)
        if better(planner, grid, best[1]):
            best = (kept, grid)
    if best[1].too_big and best[1] is not search.nothing \
            and better(planner, search.nothing, best[1]):
        best = ([graph.output], search.nothing)  # wide kept tensors fill a task's I/O
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


# Kept tensors of a run that writes zarr (`predict_to_zarr`, the CLI) may take this
# share of the free disk space where its scratch lives.
SCRATCH_SHARE = 0.5


def free_disk(where=None) -> int | None:
    """Free bytes on the file system of ``where`` (a local folder or a
    `volarray.location.Location`; the current folder by default, or the nearest
    existing folder above it); None where it is remote (an object store)."""
    import os
    import shutil
    if where is not None and not isinstance(where, (str, os.PathLike)):
        if not where.is_local:
            return None
        where = where.path
    path = os.path.abspath(where or os.getcwd())
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def default_keep(graph: Graph, spill: bool, where=None) -> tuple[int, str]:
    """The storage kept tensors may take. A run that may spill (``spill=True``:
    `predict_to_zarr`, the CLI) keeps at most half the free disk space where its scratch
    lives (``where``, a local folder; the current folder by default; on an object store,
    the input's bytes). A lazy result (``spill=False``) has nowhere to put kept tensors
    but memory, and dask may hold every chunk of one until its last reader ran (a
    barrier always does, until the statistics are known), so it keeps at most an eighth
    of the memory it will run in. Either plans within the input's bytes first and takes
    the rest only where that budget costs much compute (`volarray.planner.make_plan`).
    With it, the budget's source in words."""
    n = tensor_bytes(graph, graph.input)
    if spill:
        free = free_disk(where)
        if free is None:  # an object store
            return n, "the input's bytes, scratch being on an object store"
        return int(SCRATCH_SHARE * free), f"{SCRATCH_SHARE:.0%} of the free disk where " \
            "scratch lives"
    return int(run_memory() / 8), "an eighth of the memory the run has"


def storage_budget(graph: Graph, keep, spill: bool, where=None) -> tuple[int, str]:
    """The keep budget: the storage's (`default_keep`), never more than ``keep=``
    (`parse_keep`), which stays a hard cap; and where it came from, in words."""
    default, share = default_keep(graph, spill, where)
    if keep is None:
        return default, share
    cap = parse_keep(keep, default, tensor_bytes(graph, graph.input))
    return (default, f"{share}, below keep={keep!r}") if spill and default < cap else \
        (cap, f"keep={keep!r}")


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


# A plan computing more than this many times what a plan with more storage or memory
# would is noted (and `Plan.validate` warns); more than SLOW_REFUSED times is refused.
SLOW_NOTE = 3.0
SLOW_REFUSED = 20.0


@dataclass(frozen=True)
class Shortfall:
    """What the budgets cost a plan: it computes ``factor`` times the ``best`` (times
    one forward) of a plan with more of the budget ``parameter``; ``fix`` says how."""

    factor: float
    best: float
    parameter: str  # 'keep' or 'memory_limit'
    fix: str

    def text(self, ratio: float) -> str:
        return (f"compute {ratio:.2f}x is {self.factor:.1f}x the {self.best:.2f}x of a plan "
                f"with more {'storage' if self.parameter == 'keep' else 'memory'}: {self.fix}")


def storage_fix(graph: Graph, need: int, spill: bool, keep) -> str:
    """How to give the kept tensors ``need`` bytes: keep= (a hard cap), or free disk."""
    if spill and keep is None:
        return (f"it needs {format_bytes(need)} of scratch, above {SCRATCH_SHARE:.0%} of the "
                "free disk space where scratch lives (beside the output): free disk space "
                "there")
    lazy = "" if spill else " (kept in memory; predict_to_zarr and the CLI keep them on disk)"
    return f"pass keep='{format_bytes(need)}'{lazy}"


def shortfall(planner: Planner, kept: list[str], grid: Grid, budget: float, candidates,
              spill: bool, keep, with_limit) -> Shortfall | None:
    """Where the plan of ``kept`` on ``grid`` computes more than SLOW_NOTE times one
    forward: the better of every tensor worth keeping (more storage) and of the same
    kept tensors with a larger memory limit (``with_limit(bytes)``: a planner for it),
    if that computes more than SLOW_NOTE times less. Each is one layout, not a search:
    a bound on what more of a budget gives, cheap enough for every plan."""
    from .budget import default_memory_limit
    from .costing import model_macs
    g = planner.graph
    forward = max(model_macs(g), 1)
    ratio = grid.layout.macs / forward
    if ratio <= SLOW_NOTE:
        return None
    options = []
    every = every_worth_keeping(g)
    need = sum(tensor_bytes(g, n) for n in every if n != g.output)
    if need > budget:
        more = planner.grid(every, candidates)
        if not more.too_big:
            options.append((more.layout.macs / forward, "keep", storage_fix(g, need, spill, keep)))
    limit = max(default_memory_limit(), 4 * planner.limit)
    more = with_limit(limit).grid(kept, candidates)
    if not more.too_big:
        options.append((more.layout.macs / forward, "memory_limit",
                        f"pass memory_limit='{format_bytes(limit)}'"))
    if not options:
        return None
    best, parameter, fix = min(options)
    if ratio <= SLOW_NOTE * best:
        return None
    return Shortfall(ratio / best, best, parameter, fix)
