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
