import numpy as np
import pytest

import volarray
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.testing import assert_volume_close


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
    assert "<pre>" in plan._repr_html_()


def test_halo_and_projection_grow_with_chunks():
    model = seeded(FaultSeg3D)
    vol = np.zeros((64, 64, 64), np.float32)
    small, big = volarray.plan(model, vol, chunks=16), volarray.plan(model, vol, chunks=64)
    assert small.compute_ratio > big.compute_ratio  # more halo recompute with small tiles
    assert small.peak_bytes < big.peak_bytes
    assert max(small.output_stage.halo) > 0


def test_planner_respects_memory_limit():
    model = seeded(MultiScaleNet)
    vol = np.zeros((48, 40, 56), np.float32)
    for limit in ("2MB", "20MB"):
        plan = volarray.plan(model, vol, memory_limit=limit)
        plan.validate()
        assert plan.peak_bytes <= volarray.plan.__globals__["make_plan"].__globals__[
            "parse_bytes"](limit)


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
    assert "keep budget of 1.0 MB" in str(plans["1x"]) and "(0.00x the input)" in str(plans[0])


@pytest.mark.parametrize("keep", [-1, "-2x", "lots", "x", True, float("nan")])
def test_bad_keep_budget_is_refused(keep):
    with pytest.raises(volarray.InputError, match="keep="):
        volarray.plan(seeded(FaultSeg3D), np.zeros((16, 16, 16), np.float32), keep=keep)


def test_terabyte_plan_keeps_within_the_input_with_few_tasks():
    """FaultSeg3D over 4096^3 (256 GB of float32, planned on a lazy volume): with the
    default budget of a run that may spill (predict_to_zarr, the CLI) it keeps at most
    the input's bytes, computes at most 1.6x one forward, in at most 50,000 tasks,
    whose memory does not grow with the volume. A lazy predict keeps at most an eighth
    of this machine's memory (it has nowhere else to keep them)."""
    import dask.array as da
    import psutil
    model = seeded(FaultSeg3D)
    big = volarray.plan(model, da.zeros((4096,) * 3, np.float32, chunks=512), scratch=True)
    small = volarray.plan(model, da.zeros((512,) * 3, np.float32, chunks=512), scratch=True)
    assert big.kept_bytes <= 4 * 4096 ** 3
    assert big.compute_ratio <= 1.6 and big.n_tasks <= 50_000, str(big)
    assert big.peak_bytes <= 2 * small.peak_bytes <= 2 * big.memory_limit
    assert all(s.slab for s in small.stages)  # cache-sized slabs, not whole regions
    lazy = volarray.plan(model, da.zeros((4096,) * 3, np.float32, chunks=512))
    assert lazy.kept_bytes <= psutil.virtual_memory().total / 8
    assert lazy.compute_ratio <= 2.27 and lazy.n_tasks <= 50_000, str(lazy)
