"""What to keep between stages: rematerialization under a keep budget.

The planner keeps some tensors between stages and recomputes the rest: it adds, while
their bytes fit the keep budget, the tensors that save the most compute per byte (with
nothing kept, a norm-free network runs depth-first, each task from the input with its
receptive field's halo), and lays each candidate set out on its own grid.
"""
from __future__ import annotations

import math

from .budget import format_bytes, parse_bytes, run_memory
from .costing import Stage, cost_stage, program_for, reductions, stage_bounds
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
