"""Stages, task grid and memory projection: what will run, before it runs.

`make_plan` chooses the chunks (`volarray.grids`), what to keep between stages and what
to recompute (`volarray.keep`), and the slab each task sweeps its region in
(`volarray.costing`), and returns a frozen `Plan`: printable, with its projected peak
per task, its compute against one forward and its kept bytes, and `Plan.validate`,
which refuses a plan whose tasks exceed the memory limit before anything runs. Tasks
keep the same size at every volume size, so memory does not grow with the volume.
"""
from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch

from .budget import format_bytes, parse_bytes
from .costing import Barrier, Projection, Stage, fixed_side, model_macs, project
from .devices import compute_name, kept_dtype, kind, resolve_strategy, task_budget
from .errors import InputError, MemoryBudgetError, SlowPlanWarning
from .geometry import AXIS_NAMES, SPATIAL, coerce_chunks
from .graph import Graph, tensor_bytes
from .heap import HEAP_ENV, heap_policy_given, host_takes_freed_memory
from .grids import MAX_TASKS, Grid, Planner, candidate_chunks
from .keep import (SLOW_NOTE, SLOW_REFUSED, KeepSearch, Shortfall, better, choose_kept,
                   keep_more_to_fit, shortfall, storage_budget)
from .rates import Rates, rates_for
from .taskcount import TASK_WARNING, fewer_chunks, warn_of_many_tasks, warn_of_tiny_chunks


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass(frozen=True, eq=False)
class Plan:
    """The stages of an exact run, with their tiles, halos and projected memory:
    built complete by `make_plan`, never changed after (`dataclasses.replace` makes
    a changed copy). Its graph is frozen too (`volarray.graph`)."""

    graph: Graph
    stages: tuple[Stage, ...]
    chunks: tuple[int, int, int]  # the input's grid; `output_chunks`: the output's
    memory_limit: int
    model_macs: float  # one whole-volume forward
    kept_bytes: int  # all kept tensors between stages, whole volume
    notes: tuple[str, ...] = ()
    barriers: tuple[Barrier, ...] = ()
    # the planner chose the chunk sides (of ``planned_axes``) and even its smallest
    # candidate's tasks exceed the memory limit
    smallest_chunks_exceed_limit: bool = False
    keep_budget: int = 0  # bytes the kept tensors may take, whole volume
    keep_from: str = ""  # where the keep budget came from, in words
    planned_axes: tuple[int, ...] = ()  # axes whose chunk side the planner chose
    device: str = "cpu"  # 'cpu', 'cuda', 'cuda:N' or 'cuda:N,M'
    strategy: str = "slab"  # how a task runs a stage: 'slab' sweep or 'whole' tile
    compute_dtype: str = "float32"  # 'float32', 'tf32', 'float16' or 'bfloat16'
    budget_from: str = ""  # how a device's default memory_limit was chosen
    rates: Rates | None = None  # what the projected time is costed at
    storage: str = "memory"  # where kept tensors go: 'memory' or 'scratch' (disk)
    shortfall: Shortfall | None = None  # the budgets force much more compute than needed

    @property
    def projection(self) -> Projection:
        """Projected time in its parts (`costing.project` at ``rates``)."""
        return project(self.stages + self.barriers, self.rates)

    @property
    def projected_seconds(self) -> float:
        return self.projection.seconds if self.rates is not None else float("nan")

    @property
    def moved_bytes(self) -> int:
        """The bytes every task together reads and writes (input, kept, output)."""
        return sum(p.moved_bytes for p in self.stages + self.barriers)

    @property
    def touched_bytes(self) -> int:
        """The bytes of every op's output over every task (halos and recomputation
        included): the memory-bound work `Projection.memory_s` costs."""
        return sum(p.touched_bytes for p in self.stages + self.barriers)

    @property
    def storage_bytes(self) -> int:
        """The storage the plan needs for its kept tensors (``storage``: where)."""
        return self.kept_bytes
    skipped_tasks: int = 0  # tile tasks a mask= skips (`volarray.plan` counts them)

    @property
    def kept_dtype(self) -> str:
        """The numpy dtype of kept tensors and scratch: the compute dtype's."""
        return kept_dtype(self.compute_dtype, self.graph.dtype)

    def __post_init__(self):
        for name in ("stages", "notes", "barriers", "chunks", "planned_axes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def output_stage(self) -> Stage:
        return self.stages[-1]

    @property
    def output_chunks(self) -> tuple[int, ...]:
        """The output's chunk shape (what ``chunks=`` gives; ``chunks`` is the input's
        grid, which differs where the output's scale is not 1)."""
        return self.output_stage.chunk_shape

    def chunks_text(self) -> str:
        out = self.output_chunks
        return f"{out}" if out == self.chunks else f"{out} (input chunks {self.chunks})"

    @property
    def n_tasks(self) -> int:
        return sum(s.n_tasks for s in self.stages) + sum(b.n_tasks for b in self.barriers)

    @property
    def costed_tasks(self) -> int:
        """The tasks the projected overhead charges: those of ``n_tasks`` that run ops
        (not the ones that pick up statistics a stage's tasks computed)."""
        return sum(p.costed_tasks for p in self.stages + self.barriers)

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
                f"chunks={self.output_chunks}, above memory_limit={format_bytes(limit)}; "
                f"{self._budget_fix(worst.peak_bytes)}", parameter='memory_limit')
        self.check_shortfall()
        return self

    def check_shortfall(self) -> None:
        """Refuse (MemoryBudgetError) a plan whose budgets force more than SLOW_REFUSED
        times the compute of a plan with more storage or memory; warn
        (SlowPlanWarning) past SLOW_NOTE times. Both name the budget to raise."""
        short = self.shortfall
        if short is None:
            return
        if short.factor > SLOW_REFUSED:
            raise MemoryBudgetError(f"the plan is refused: {short.text(self.compute_ratio)}",
                                    parameter=short.parameter)
        warnings.warn(f"slow plan: {short.text(self.compute_ratio)}", SlowPlanWarning,
                      stacklevel=3)

    def time_line(self) -> str:
        """``projected time ...: compute ..., I/O ..., overhead ...``."""
        if self.rates is None:
            return "projected time unknown (no rates)"
        t, r = self.projection, self.rates
        memory = "" if r.memory_bytes_per_s is None else (
            f", memory-bound ops {t.memory_s:.3g} s ({format_bytes(self.touched_bytes)} of "
            f"op outputs at {format_bytes(r.memory_bytes_per_s)}/s)")
        return (f"projected time {t.seconds:.3g} s: compute {t.compute_s:.3g} s "
                f"({self.planned_macs / 1e9:.1f} GMAC at {r.macs_per_s / 1e9:.3g} GMAC/s)"
                f"{memory}, I/O {t.io_s:.3g} s ({format_bytes(self.moved_bytes)} at "
                f"{format_bytes(r.bytes_per_s)}/s), overhead {t.overhead_s:.3g} s "
                f"({_plural(self.costed_tasks, 'task')} at {r.task_s * 1e3:.3g} ms"
                f"{uncosted_text(self)}; rates: {r.source})")

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
                f"{self.chunks_text()}, peak {format_bytes(self.peak_bytes)}/task, compute "
                f"{self.compute_ratio:.2f}x, kept {format_bytes(self.kept_bytes)}>")

    def summary(self) -> list[str]:
        """The lines above the table: shapes, chunks, memory, compute, kept bytes."""
        g = self.graph
        inp, out = g.nodes[g.input], g.nodes[g.output]
        return [
            f"volarray plan: exact mode, {_plural(len(self.stages), 'stage')}, "
            f"{_plural(self.n_tasks, 'task')}"
            + (f" ({self.skipped_tasks} skipped by the mask)" if self.skipped_tasks else ""),
            f"input  {inp.channels} x {inp.shape}   output {out.channels} x {out.shape}",
            f"device {self.device}   strategy {self.strategy}   compute {self.compute_dtype}"
            + (f"   memory limit {self.budget_from}" if self.budget_from else ""),
            f"chunks {self.chunks_text()}   memory limit {format_bytes(self.memory_limit)} per task   "
            f"projected peak {format_bytes(self.peak_bytes)} per task",
            f"compute {self.compute_ratio:.2f}x one whole-volume forward "
            f"({self.model_macs / 1e9:.1f} GMAC); {kept_text(self)}",
            self.time_line()] + ([f"slow plan: {self.shortfall.text(self.compute_ratio)}"]
                                 if self.shortfall else [])

    def _scale(self, name: str) -> str:
        scale = self.graph.nodes[name].scale
        return str(scale[0]) if len(set(scale)) == 1 else ",".join(str(x) for x in scale)

    def stage_row(self, s: Stage) -> tuple[str, ...]:
        """stage, output, scale, chunk, slab, tasks, halo, peak/task, ops, sources."""
        return (str(s.index), s.output, self._scale(s.output), str(s.chunk_shape),
                str(s.slab or "-"), str(s.n_tasks), str(s.halo), format_bytes(s.peak_bytes),
                str(len(s.program.order)), ", ".join(s.sources))

    def barrier_text(self, b: Barrier) -> str:
        where = f"barrier {self.graph.globals[b.name].where}: statistics of {b.program.output}"
        if b.by_stage is not None:
            return f"{where} over {b.n_tasks} chunks, computed by stage {b.by_stage}'s tasks " \
                   "as they make it"
        how = (f"recomputed from {', '.join(b.program.sources)} "
               f"({_plural(len(b.program.order), 'op')})"
               if b.recomputed else "read from the kept tensor")
        return (f"{where} over {b.n_tasks} chunks, {how}, "
                f"+{b.macs / max(self.model_macs, 1):.2f}x compute, "
                f"peak {format_bytes(b.peak_bytes)}/task")

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


def chunks_note(planner: Planner, grid: Grid, planned: tuple[int, ...]) -> str:
    """How the planner chose the chunk sides of ``planned`` axes."""
    which = "" if len(planned) == SPATIAL else \
        " on " + ", ".join(AXIS_NAMES[a] for a in planned) + " (the others given)"
    return (f"chunks {grid.layout.stages[-1].chunk_shape} chosen{which}: the largest even "
            f"split aligned to {planner.align} whose tasks read and write at most "
            f"{format_bytes(planner.io_target)} and fit {format_bytes(planner.limit)}"
            + (f", grown to keep the graph under {MAX_TASKS:,} tasks" if grid.grown else ""))


def input_chunks(graph: Graph, given) -> tuple[tuple | None, list[str]]:
    """The input grid whose output chunks are ``given`` (the user's chunks are the
    output's, as `coerce_chunks` returns them): each side divided by the output's scale
    (a stride-2 head's output chunks of 4 come from input chunks of 8), at most the
    input's side; and a note for each axis where no input side gives the output side
    asked for (an odd side of an output twice the input's size)."""
    if given is None:
        return None, []
    shape = graph.nodes[graph.input].shape
    out_node = graph.nodes[graph.output]
    sides, notes = [], []
    for axis, (c, s, n, m) in enumerate(zip(given, out_node.scale, shape, out_node.shape)):
        if c is None or s == 1:
            sides.append(c)
            continue
        near = max(1, min(n, round(c / s)))
        side = min((b for b in (near, near - 1, near + 1) if 1 <= b <= n),
                   key=lambda b: (abs(fixed_side(b, s, m) - c), b != near))
        got = fixed_side(side, s, m)
        if got != c:
            notes.append(f"chunks: the output is {s} times the input along {AXIS_NAMES[axis]}, "
                         f"so its chunks there are {got}, the nearest side to the {c} asked for")
        sides.append(side)
    return tuple(sides), notes


def host_memory_notes(device: str) -> list[str]:
    """What the projection leaves out on this machine: on a VM whose host takes back
    freed memory, the tasks' faulting in again of what earlier tasks gave back
    (`benchmarks/results/cost.md`: runs took 1.0-1.75x their projection there, against
    0.95-1.55x with freed memory kept). Not where the user chose a policy
    (``VOLARRAY_HEAP`` set, to either). It reads the machine that plans: a cluster's
    workers are taken to be alike."""
    if kind(device) != "cpu" or heap_policy_given() or not host_takes_freed_memory():
        return []
    return ["this machine's host takes back the memory each task frees (virtio free page "
            "reporting), and later tasks fault it in again at the host's pace, which the "
            f"projected time leaves out; {HEAP_ENV}=reuse keeps freed memory in the process "
            "for the next task (faster on such VMs in volarray's benchmarks, at a higher "
            "peak)"]


def choose_plan(planner: Planner, budget: int, keep, spill: bool, planner_for,
                search: KeepSearch):
    """The kept tensors and the grid of the fastest plan within the budgets, its notes,
    and its `Shortfall` where the budgets cost it much compute."""
    candidates = search.candidates
    kept, grid = choose_kept(planner, budget, search)
    kept, grid, notes = keep_more_to_fit(planner, kept, grid, candidates, keep)
    short = None if grid.too_big else shortfall(
        planner, kept, grid, budget, candidates, spill, keep, planner_for)
    return kept, grid, notes, short


def kept_text(plan: Plan) -> str:
    """What ``plan`` keeps between stages, where, and the keep budget it came from."""
    if len(plan.stages) == 1:
        return "one stage: nothing is kept between stages"
    return (f"kept between stages {format_bytes(plan.kept_bytes)} "
            f"({plan.kept_bytes / max(plan.input_bytes, 1):.2f}x the input) in "
            f"{plan.storage}, of a keep budget of {format_bytes(plan.keep_budget)}"
            f"{f' ({plan.keep_from})' if plan.keep_from else ''}; the rest is recomputed")


def uncosted_text(plan: Plan) -> str:
    """The tasks of ``plan.n_tasks`` its overhead does not charge, and why."""
    rest = plan.n_tasks - plan.costed_tasks
    return f", not the {_plural(rest, 'merge task')}, which only gather statistics " \
        "their stages computed" if rest else ""


def keep_budget_source(graph: Graph, keep, budget: int, source: str) -> str:
    """Where ``budget``, the plan's keep budget, came from, in words: ``source``
    (`storage_budget`'s) where ``keep=`` was given or the storage's share is below the
    input's bytes, which a run plans within first."""
    n = tensor_bytes(graph, graph.input)
    if keep is not None or budget < n:
        return source
    if budget == n:
        return "the input's bytes"
    return (f"{source}, past the input's bytes: within them the plan would compute over "
            f"{SLOW_NOTE:g}x what more storage or memory gives")


def make_plan(graph: Graph, chunks=None, memory_limit=None, device: str = "cpu",
              keep=None, spill: bool = False, strategy=None, compute_dtype=None,
              rates=None, scratch_at=None) -> Plan:
    """The plan of an exact run. ``chunks``: the output's chunks, as `coerce_chunks`
    takes them (None on an axis: the planner's choice); ``keep``: a hard cap on the
    kept tensors (see `parse_keep`; the storage's budget is `default_keep`'s: half the
    free disk at ``scratch_at`` where they may ``spill`` to scratch, else memory);
    ``strategy``: 'slab' or 'whole' (by default the device's, `resolve_strategy`); on a
    GPU the default memory_limit is the device's (`volarray.devices.task_budget`);
    ``rates``: a `volarray.rates.Rates` (by default `rates_for` the device's)."""
    strategy = resolve_strategy(strategy, device)
    if compute_dtype is None and graph.dtype not in (torch.float32, torch.float16,
                                                      torch.bfloat16):
        raise InputError(f"the model's weights are {graph.dtype}; exact mode computes in "
                         "float32, float16 or bfloat16: pass model.float()",
                         parameter="model")
    compute = compute_name(graph.dtype if compute_dtype is None else compute_dtype)
    parse_bytes(memory_limit)  # refused before a device is asked
    limit, budget_from = task_budget(memory_limit, device, graph.gm)
    rates = rates_for(device, rates)
    shape = graph.nodes[graph.input].shape
    given, chunk_notes = input_chunks(graph,
                                      coerce_chunks(chunks, graph.nodes[graph.output].shape))

    def planner_for(lim) -> Planner:
        p = Planner.for_device(graph, lim, device, strategy, rates)
        return p if given is None else replace(p, fixed_output=tuple(c is not None
                                                                     for c in given))
    planner = planner_for(memory_limit if limit is None else limit)
    step = max(max(planner.align), 8)  # the smallest chunk side worth suggesting
    estimate = warn_of_tiny_chunks(shape, given, step)
    planned = tuple(range(SPATIAL)) if given is None else \
        tuple(a for a, c in enumerate(given) if c is None)
    budget, source = storage_budget(graph, keep, spill, scratch_at)
    # A run first plans within the input's bytes, and takes more of its storage (half
    # the free disk where it may spill, an eighth of memory where not) only where that
    # budget costs it much compute: the cost model undercounts small tasks, and
    # FaultSeg3D 256^3 to zarr planned over the whole room (392 tasks, 1.8 GB kept) ran
    # 2.0x slower (54 s against 27 s) than within the input's bytes (16 tasks) though
    # projected faster.
    first = min(budget, tensor_bytes(graph, graph.input)) if keep is None else budget
    search = KeepSearch(planner, candidate_chunks(shape, planner.align, given))
    if budget > first and search.slow_within(first):
        first = budget  # no plan within the input's bytes computes within SLOW_NOTE
    kept, grid, notes, short = choose_plan(planner, first, keep, spill, planner_for, search)
    more = choose_plan(planner, budget, keep, spill, planner_for, search) \
        if short is not None and budget > first else None
    if more is not None and better(planner, more[1], grid):
        kept, grid, notes, short = more
    else:
        budget = first
    keep_from = keep_budget_source(graph, keep, budget, source)
    if given is not None:
        short = None  # chunks the user gave are theirs (they may take more storage, above)
    if planned:
        notes.insert(0, chunks_note(planner, grid, planned))
    notes = chunk_notes + notes + host_memory_notes(device)
    stages = grid.layout.stages
    # kept tensors are stored in the compute dtype (float16 runs keep half the bytes)
    stored = np.dtype(kept_dtype(compute, graph.dtype)).itemsize
    plan = Plan(graph, stages, grid.base, planner.limit, model_macs(graph),
                kept_bytes=sum(tensor_bytes(graph, s.output) for s in stages[:-1])
                * stored // graph.value_bytes,
                notes=tuple(notes), barriers=grid.layout.barriers,
                smallest_chunks_exceed_limit=grid.too_big and bool(planned),
                keep_budget=budget, keep_from=keep_from, planned_axes=planned, device=device,
                strategy=strategy, compute_dtype=compute, budget_from=budget_from,
                rates=rates, storage="scratch" if spill else "memory", shortfall=short)
    if estimate <= TASK_WARNING < plan.n_tasks:  # not foreseen: stages and barriers
        warn_of_many_tasks(plan.n_tasks, f"the plan of chunks={plan.chunks} has "
                           f"{plan.n_tasks:,} tasks", fewer_chunks(shape, step))
    return plan
