import copy
import dataclasses

import numpy as np
import pytest
import torch

import volarray
from volarray.models import FaultSeg3D, GroupNormNet, MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

import volarray.planner as PLAN


def test_plan_is_printable_and_complete():
    model = seeded(FaultSeg3D)
    plan = volarray.plan(model, np.zeros((64, 48, 40), np.float32), chunks=(32, 24, 40))
    text = str(plan)
    for needle in ("stage", "halo", "peak/task", "tasks", "chunks (32, 24, 40)", "compute",
                   "sigmoid"):
        assert needle in text
    assert plan.n_tasks == sum(s.n_tasks for s in plan.stages)
    assert plan.output_stage.n_tasks == 2 * 2 * 1
    assert plan.compute_ratio >= 1.0
    fmt = PLAN.format_bytes
    assert repr(plan) == (f"<volarray.Plan exact: 2 stages, {plan.n_tasks} tasks, chunks "
                          f"(32, 24, 40), peak {fmt(plan.peak_bytes)}/task, compute "
                          f"{plan.compute_ratio:.2f}x, kept {fmt(plan.kept_bytes)}>")
    page = plan._repr_html_()
    assert page.count("<tr>") == 1 + len(plan.stages) and "<th>peak/task</th>" in page
    assert "\n" not in repr(plan) and str(plan).startswith("volarray plan: exact mode")


def test_plan_is_frozen_and_html_is_escaped():
    plan = volarray.plan(seeded(GroupNormNet), np.zeros((23, 22, 19), np.float32), chunks=8)
    assert isinstance(plan.stages, tuple) and isinstance(plan.barriers, tuple)
    assert isinstance(plan.notes, tuple)
    for obj, name in ((plan, "chunks"), (plan.stages[0], "slab"), (plan.barriers[0], "macs")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    page = plan._repr_html_()
    assert page.count("<tr>") == 1 + len(plan.stages) + len(plan.barriers)
    assert f", {len(plan.barriers)} barriers, " in repr(plan)
    noted = dataclasses.replace(plan, notes=("a <b> & 'c'",))
    assert "a &lt;b&gt; &amp; &#x27;c&#x27;" in noted._repr_html_()
    assert "<b>" not in noted._repr_html_() and noted.stages is plan.stages


def test_validate_counts_barrier_tasks():
    """Barrier tasks run a program over their regions as stages do: with keep=0 and
    8^3 chunks, GroupNormNet's statistics tasks are its largest, and a limit between
    the largest stage's and the largest barrier's peak is refused, naming the barrier."""
    plan = volarray.plan(seeded(GroupNormNet), np.zeros((23, 22, 19), np.float32),
                         chunks=8, keep=0)
    stage_peak = max(s.peak_bytes for s in plan.stages)
    barrier = max(plan.barriers, key=lambda b: b.peak_bytes)
    assert barrier.peak_bytes > stage_peak > 0
    assert plan.largest_task is barrier and plan.peak_bytes == barrier.peak_bytes
    assert "peak" in str(plan).split("barrier", 1)[1]
    limit = (stage_peak + barrier.peak_bytes) // 2
    with pytest.raises(volarray.MemoryBudgetError,
                       match=r"^barrier .*, the statistics of .*, needs .*smaller chunks"):
        plan.validate(limit)
    assert plan.validate(barrier.peak_bytes) is plan
    # the planner, given that limit, stops merging the barriers' coarse chunks, as it
    # does a stage's, so that its barrier tasks fit too (and the result stays exact)
    vol = random_volume((23, 22, 19), seed=2)
    # keep=0 recomputes every barrier's source from the input, in these small tasks: the
    # plan computes several times what keeping tensors would, and says so (issue 27)
    fitted = volarray.plan(seeded(GroupNormNet), vol, memory_limit=limit, keep=0)
    with pytest.warns(volarray.SlowPlanWarning, match="more storage: pass keep="):
        assert fitted.validate() is fitted and fitted.peak_bytes <= limit
    assert sum(b.n_tasks for b in fitted.barriers) > sum(b.n_tasks for b in plan.barriers)
    with pytest.warns(volarray.SlowPlanWarning, match="keep="):
        y = volarray.predict(seeded(GroupNormNet), vol, memory_limit=limit, keep=0)
    assert_volume_close(y.compute(), whole_volume(seeded(GroupNormNet), vol), atol=1e-5)
    with pytest.raises(volarray.MemoryBudgetError,
                       match=r"^(stage|barrier) .* needs .*smallest chunks.*memory_limit >="):
        volarray.plan(seeded(GroupNormNet), vol, memory_limit=stage_peak // 2, keep=0).validate()


def test_halo_and_projection_grow_with_chunks():
    model = seeded(FaultSeg3D)
    vol = np.zeros((64, 64, 64), np.float32)
    small, big = volarray.plan(model, vol, chunks=16), volarray.plan(model, vol, chunks=64)
    assert small.compute_ratio > big.compute_ratio  # more halo recompute with small tiles
    assert small.peak_bytes < big.peak_bytes
    assert max(small.output_stage.halo) > 0


def test_a_half_model_is_planned_at_half_the_bytes():
    """Bytes per value come from the model's dtype: a float16 model's tasks and kept
    tensors take half the bytes of the same model in float32."""
    model = seeded(FaultSeg3D)
    vol = np.zeros((32, 32, 24), np.float32)
    full = volarray.plan(model, vol, chunks=(16, 16, 24), keep="4x")
    half = volarray.plan(copy.deepcopy(model).half(), vol, chunks=(16, 16, 24), keep="4x")
    assert half.graph.dtype == torch.float16 and full.graph.dtype == torch.float32
    assert [s.output for s in half.stages] == [s.output for s in full.stages]
    assert full.kept_bytes > 0 and half.kept_bytes == pytest.approx(full.kept_bytes / 2)
    assert half.peak_bytes == pytest.approx(full.peak_bytes / 2, rel=0.01)
    assert half.input_bytes == full.input_bytes / 2


def test_the_plans_graph_is_frozen():
    plan = volarray.plan(seeded(FaultSeg3D), np.zeros((16, 16, 16), np.float32))
    graph = plan.graph
    with pytest.raises(TypeError):
        graph.nodes[graph.output] = graph.nodes[graph.input]
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.output = graph.input
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.nodes[graph.output].channels = 3


def test_every_run_is_validated_against_the_default_budget(monkeypatch):
    """No memory_limit given: a run whose tasks exceed the default budget per task (an
    eighth of this machine's memory, here made 100 kB) is refused before anything runs."""
    import volarray.grids
    monkeypatch.setattr(volarray.grids, "default_memory_limit", lambda: 100_000)
    model = seeded(FaultSeg3D)
    vol = np.zeros((32, 32, 24), np.float32)
    with pytest.raises(volarray.MemoryBudgetError, match="memory_limit=100.0 kB"):
        volarray.predict(model, vol, chunks=(32, 32, 24))


def test_planner_respects_memory_limit():
    model = seeded(MultiScaleNet)
    vol = np.zeros((48, 40, 56), np.float32)
    for limit in ("2MB", "20MB"):
        plan = volarray.plan(model, vol, memory_limit=limit)
        plan.validate()
        assert plan.peak_bytes <= PLAN.parse_bytes(limit)


def test_assert_volume_close_reports_location():
    a = np.zeros((2, 3, 4, 5), np.float32)
    b = a.copy()
    b[1, 2, 3, 4] = 1e-3
    with pytest.raises(AssertionError, match=r"\(1, 2, 3, 4\)"):
        assert_volume_close(a, b)
    with pytest.raises(AssertionError, match="shape"):
        assert_volume_close(a, b[0])
    assert assert_volume_close(a, b, atol=1e-2) == pytest.approx(1e-3)


def test_keep_budget_is_spent_where_it_saves_most():
    """More budget, less compute; the budget is never exceeded; the plan says both."""
    model = seeded(FaultSeg3D)
    vol = np.zeros((64, 64, 64), np.float32)
    plans = {k: volarray.plan(model, vol, chunks=32, keep=k) for k in (0, "1x", "4x", "1GB")}
    assert plans[0].kept_bytes == 0 and len(plans[0].stages) == 1  # depth-first
    assert plans[0].compute_ratio > plans["1x"].compute_ratio >= plans["4x"].compute_ratio
    for k, p in plans.items():
        assert p.kept_bytes <= p.keep_budget, k
    assert plans["4x"].keep_budget == 4 * vol.nbytes and plans["1GB"].keep_budget == 10 ** 9
    assert "keep budget of 1.0 MB (keep='1x')" in str(plans["1x"])
    assert "one stage: nothing is kept" in str(plans[0])


def test_the_plan_says_where_its_keep_budget_came_from(monkeypatch):
    """The keep budget's source in words: the input's bytes by default, the storage's
    share where the planner took it (within the input's bytes the plan was slow), the
    user's keep=; one stage keeps nothing; barrier tasks that only merge statistics are
    not charged the per-task overhead, and the time line says so."""
    from volarray import keep as keep_module
    from volarray.models import InstanceNormUNet
    vol = np.zeros((64, 64, 64), np.float32)
    fault = seeded(FaultSeg3D)
    default = volarray.plan(fault, vol, chunks=32)
    assert default.keep_from == "the input's bytes" and default.keep_budget == vol.nbytes
    assert "of a keep budget of 1.0 MB (the input's bytes)" in str(default)
    mine = volarray.plan(fault, vol, chunks=32, keep="4x")
    assert mine.keep_from == "keep='4x'" and "(keep='4x')" in str(mine)
    # a disk whose share is below the user's cap sets the budget
    monkeypatch.setattr(keep_module, "free_disk", lambda where=None: 4 * vol.nbytes)
    disk = volarray.plan(fault, vol, chunks=32, keep="4x", scratch=True)
    assert disk.keep_budget == 2 * vol.nbytes
    assert disk.keep_from == "50% of the free disk where scratch lives, below keep='4x'"
    monkeypatch.setattr(keep_module, "free_disk", lambda where=None: None)  # a store
    assert volarray.plan(fault, vol, chunks=32, scratch=True).keep_from == "the input's bytes"
    whole = volarray.plan(fault, vol)
    assert len(whole.stages) == 1 and "one stage: nothing is kept between stages" in str(whole)
    norms = volarray.plan(seeded(InstanceNormUNet), vol, chunks=16)
    assert norms.keep_budget > vol.nbytes
    assert norms.keep_from == ("an eighth of the memory the run has, past the input's bytes: "
                               "within them the plan would compute over 3x what more "
                               "storage or memory gives")
    assert volarray.plan(seeded(InstanceNormUNet), vol, chunks=16, keep="1x").compute_ratio \
        > 3 * norms.compute_ratio  # why the planner took more
    rest = norms.n_tasks - norms.costed_tasks
    assert rest > 0 and f"{norms.costed_tasks} tasks at " in norms.time_line()
    assert f"not the {rest} merge tasks, which only gather statistics" in norms.time_line()
    assert "recomputed from x (1 op)," in str(norms)  # its first norm's conv, not "1 ops"


def test_a_larger_keep_budget_never_costs_more_compute():
    """At 256^3 the greedy order for 4x the input began with a tensor whose stage needs
    smaller tasks (its channels fill a task's I/O bytes sooner), and the plan computed
    1.58x one forward against 1.35x at 1x: every kept set the greedy orders of the
    budget and of the smaller budgets give is laid out on its own grid now."""
    import dask.array as da
    model = seeded(FaultSeg3D)
    vol = da.zeros((256,) * 3, np.float32, chunks=128)
    ratios = [volarray.plan(model, vol, keep=k).compute_ratio
              for k in (0, "1x", "2x", "4x", "8x")]
    assert all(a >= b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] < 1.3 and ratios[3] < 1.36, ratios


@pytest.mark.parametrize("keep", [-1, "-2x", "lots", "x", True, float("nan")])
def test_bad_keep_budget_is_refused(keep):
    with pytest.raises(volarray.InputError, match="keep="):
        volarray.plan(seeded(FaultSeg3D), np.zeros((16, 16, 16), np.float32), keep=keep)


def test_terabyte_plan_keeps_within_the_input_with_few_tasks(monkeypatch):
    """FaultSeg3D over 4096^3 (256 GB of float32, planned on a lazy volume): a run that
    may spill (predict_to_zarr, the CLI) keeps at most half the free disk where scratch
    lives (issue 27; here a disk with twice the input's bytes free, so that it keeps at
    most the input's bytes, as its default budget was before), computes at most 1.6x
    one forward, in at most 50,000 tasks, whose memory does not grow with the volume. A
    lazy predict keeps at most an eighth of this machine's memory (it has nowhere else
    to keep them)."""
    import dask.array as da
    import psutil
    monkeypatch.setattr("volarray.keep.free_disk", lambda where=None: 2 * 4 * 4096 ** 3)
    model = seeded(FaultSeg3D)
    big = volarray.plan(model, da.zeros((4096,) * 3, np.float32, chunks=512), scratch=True)
    small = volarray.plan(model, da.zeros((512,) * 3, np.float32, chunks=512), scratch=True,
                          keep="1x")
    assert big.kept_bytes <= 4 * 4096 ** 3
    assert big.compute_ratio <= 1.6 and big.n_tasks <= 50_000, str(big)
    assert big.peak_bytes <= 2 * small.peak_bytes <= 2 * big.memory_limit
    assert all(s.slab for s in small.stages)  # cache-sized slabs, not whole regions
    lazy = volarray.plan(model, da.zeros((4096,) * 3, np.float32, chunks=512))
    assert lazy.kept_bytes <= psutil.virtual_memory().total / 8
    assert lazy.compute_ratio <= 2.27 and lazy.n_tasks <= 50_000, str(lazy)


def test_a_task_is_swept_only_where_that_saves_memory_worth_its_time():
    """FaultSeg3D's one 128^3 task swept in 8-row slabs held 17% less and ran 1.7x
    slower than whole: it runs whole. At 256^3 its stages' sweeps hold under 60% of
    their whole regions and are kept."""
    model = seeded(FaultSeg3D)
    small = volarray.plan(model, np.zeros((128,) * 3, np.float32))
    assert [s.slab for s in small.stages] == [None], str(small)
    big = volarray.plan(model, np.zeros((256,) * 3, np.float32))
    assert all(s.slab for s in big.stages), str(big)


def test_terabyte_plan_with_ten_norm_barriers(monkeypatch):
    """InstanceNormUNet over 4096^3 (10 sequential barriers): keeping at most the
    input's bytes, within 5x one forward in at most 100,000 tasks, every task (of a
    stage or of a barrier's statistics) within the memory limit. A statistics task
    reduces each slab's output as it goes and never holds its output region: counted
    as held, the deep barriers shrank every task to 192^3 (5.13x, 127,776 tasks)."""
    import dask.array as da
    from volarray.models import InstanceNormUNet
    # a disk with twice the input's bytes free: kept tensors take at most the input's
    monkeypatch.setattr("volarray.keep.free_disk", lambda where=None: 2 * 4 * 4096 ** 3)
    plan = volarray.plan(seeded(InstanceNormUNet), da.zeros((4096,) * 3, np.float32,
                                                             chunks=512), scratch=True)
    assert len(plan.barriers) == 10 and plan.kept_bytes <= 4 * 4096 ** 3
    assert plan.compute_ratio <= 5 and plan.n_tasks <= 100_000, str(plan)
    # each barrier recomputes what lies above it: keeping every tensor would compute
    # about 1x, and the plan says which budget holds it back (issue 27)
    with pytest.warns(volarray.SlowPlanWarning, match="more storage: it needs .* of scratch"):
        assert plan.validate() is plan


VOL = random_volume((40, 48, 56), seed=5)  # odd per axis after FaultSeg3D's 3 max-pools


@pytest.fixture(scope="module")
def fault():
    return seeded(FaultSeg3D, width=4)


@pytest.mark.parametrize("chunks,want", [
    (-1, (40, 48, 56)),  # dask's -1: the whole axis, here on every axis
    ((32, -1, 48), (32, 48, 48)),
    ((100, 20, 100), (40, 20, 56)),  # sides past the volume are clipped to it
    ({0: 32, 1: -1, 2: 24}, (32, 48, 24)),
    ({-3: 32, -2: 16, -1: 8}, (32, 16, 8)),
])
def test_chunks_in_dasks_forms(fault, chunks, want):
    plan = volarray.plan(fault, VOL, chunks=chunks)
    assert plan.chunks == want and plan.planned_axes == ()
    assert plan.output_stage.chunk_shape == want
    assert not any("chosen" in n for n in plan.notes)


def test_auto_chunks_are_the_planners():
    plans = [volarray.plan(seeded(FaultSeg3D, width=4), VOL, chunks=c, memory_limit="30MB")
             for c in (None, "auto", (None, "auto", None), {})]
    assert len({p.chunks for p in plans}) == 1
    assert all(p.planned_axes == (0, 1, 2) and "chosen:" in p.notes[0] for p in plans)


def test_axes_left_out_are_the_planners_choice(fault):
    """A dict's missing axes (and None / 'auto' in a tuple) are chosen by the planner,
    the axes named stay as given; with a limit, the free sides shrink to fit it."""
    roomy = volarray.plan(fault, VOL, chunks={0: 8})
    assert roomy.chunks == (8, 48, 56) and roomy.planned_axes == (1, 2)
    assert "chosen on y, x (the others given)" in roomy.notes[0]
    limit = roomy.peak_bytes // 3
    tight = volarray.plan(fault, VOL, chunks=(8, None, "auto"), memory_limit=limit)
    assert tight.chunks[0] == 8 and tight.chunks[1] < 48 and tight.chunks[2] < 56
    assert tight.chunks[1] == tight.chunks[2] and tight.chunks[1] % 8 == 0  # aligned
    assert tight.validate() is tight
    with pytest.raises(volarray.MemoryBudgetError,
                       match=r"chunks=\(8, 8, 56\).*smallest chunks the planner can align "
                             r"on z, y, so pass a smaller side on x or memory_limit >="):
        volarray.plan(fault, VOL, chunks={2: 56}, memory_limit="1kB").validate()


def test_whole_axis_chunks_equal_the_whole_volume_forward(fault):
    y = volarray.predict(fault, VOL, chunks=(-1, 40, -1))
    assert y.chunks[1:] == ((40,), (40, 8), (56,))
    assert_volume_close(y.compute(), whole_volume(fault, VOL), atol=1e-5)


@pytest.mark.parametrize("chunks,needle", [
    ((8, -2, 8), "non-positive side -2 on axis y.*-1 for the whole axis"),
    ((8, 8.0, 8), r"8\.0 on axis y, which is not a chunk side"),
    ((8, True, 8), "True on axis y"),
    ({3: 8}, "names axis 3.*0, 1, 2"),
    ({0: 8, -3: 8}, "names axis z twice"),
    ("big", "not a chunk shape.*three ints"),
    ((8, 8, 8, 8), "has 4 sides"),
])
def test_bad_chunks_name_the_value_and_the_fix(fault, chunks, needle):
    with pytest.raises(volarray.InputError, match=needle) as info:
        volarray.plan(fault, VOL, chunks=chunks)
    assert f"chunks={chunks!r}" in str(info.value) and info.value.parameter == "chunks"
