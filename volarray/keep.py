"""What to keep between stages: rematerialization under a keep budget.

The planner keeps some tensors between stages and recomputes the rest: it adds, while
their bytes fit the keep budget, the tensors that save the most compute per byte (with
nothing kept, a norm-free network runs depth-first, each task from the input with its
receptive field's halo), and lays each candidate set out on its own grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def budget_ladder(budget: float, input_bytes: int, worth: float = math.inf) -> list[float]:
    """``budget`` and the powers of two times the input's bytes below it (from an
    eighth): the budgets whose greedy kept sets `choose_kept` compares. Past ``worth``
    (the bytes of every tensor worth keeping) a budget keeps no more."""
    budget = min(budget, worth)
    ladder, b = [budget], input_bytes / 8
    while b < budget:
        ladder.append(b)
        b *= 2
    return ladder


def better(planner: "Planner", grid: "Grid", best: "Grid") -> bool:
    """``grid`` fits where ``best`` does not, or fits as well and is projected faster
    (by more than 0.1%: fewer kept tensors win a tie)."""
    if best.too_big != grid.too_big:
        return best.too_big
    return planner.seconds(grid.layout) < (1 - 1e-3) * planner.seconds(best.layout)


def choose_kept(planner: "Planner", budget: float, candidates) -> tuple[list[str], "Grid"]:
    """The output plus the kept tensors whose plan is projected fastest, with their
    grid (MACs at the device's rate, bytes read and written at the storage's, and
    each task's overhead: `Planner.seconds`).
    Kept tensors cut the network into stages; the others are recomputed, halo
    included, by every stage and barrier that reads them. The greedy order is costed
    on one grid, but a kept tensor's stage may need smaller tasks (its sources and
    output must fit a task's I/O bytes), and smaller tasks recompute more halo: so each
    prefix of the greedy orders of ``budget`` and of the smaller budgets of
    `budget_ladder` is laid out on its own grid and the fastest set whose tasks fit is
    chosen (so that 4x the input never costs more than 1x or 2x)."""
    graph = planner.graph
    nothing = planner.grid([graph.output], candidates)
    compute = Compute(graph, nothing.base)
    sets = set()
    worth = sum(tensor_bytes(graph, c) for c in keep_candidates(graph))
    for b in budget_ladder(budget, tensor_bytes(graph, graph.input), worth):
        order = keep_order(graph, b, compute)
        sets.update(frozenset(order[:k]) for k in range(1, len(order) + 1))
    # fewer kept tensors first, replaced only to fit or to save
    best = ([graph.output], nothing)
    for chosen in sorted(sets, key=lambda c: (len(c), sorted(c))):
        kept = [n for n in graph.nodes if n in chosen or n == graph.output]
        grid = planner.grid(kept, candidates)
        if better(planner, grid, best[1]):
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


def default_keep(graph: Graph, spill: bool, where=None) -> int:
    """A run that may spill (``spill=True``: `predict_to_zarr`, the CLI) keeps at most
    half the free disk space where its scratch lives (``where``, a local folder; the
    current folder by default; on an object store, the input's bytes). A lazy result (``spill=False``) has nowhere to put
    kept tensors but memory, and dask may hold every chunk of one until its last reader
    ran (a barrier always does, until the statistics are known), so it keeps at most
    the input's bytes and an eighth of the memory it will run in, and recomputes the
    rest."""
    n = tensor_bytes(graph, graph.input)
    if spill:
        free = free_disk(where)
        return n if free is None else int(SCRATCH_SHARE * free)  # a store: the input's
    return int(min(n, run_memory() / 8))


def storage_budget(graph: Graph, keep, spill: bool, where=None) -> int:
    """The keep budget: the storage's (`default_keep`), never more than ``keep=``
    (`parse_keep`), which stays a hard cap."""
    default = default_keep(graph, spill, where)
    if keep is None:
        return default
    cap = parse_keep(keep, default, tensor_bytes(graph, graph.input))
    return min(cap, default) if spill else cap


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
