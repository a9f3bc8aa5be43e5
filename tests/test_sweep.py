"""Tasks swept in slabs along z: each node keeps the rows the next slab reads, so a
task's result equals one whole-volume forward while its memory is one slab's."""
import dataclasses

import numpy as np
import pytest
import torch

import volarray
from volarray.models import (FaultSeg3D, GroupNormNet, InstanceNormUNet, MultiScaleNet,
                             seeded)
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

import volarray.costing as PLAN

CASES = {  # odd shapes, chunks that do not divide them
    "FaultSeg3D": (lambda: seeded(FaultSeg3D), (40, 32, 48), (21, 17, 29)),
    "MultiScaleNet": (lambda: seeded(MultiScaleNet), (33, 22, 19), None),
    "InstanceNormUNet": (lambda: seeded(InstanceNormUNet, width=8), (20, 28, 36), (13, 28, 36)),
    "GroupNormNet": (lambda: seeded(GroupNormNet), (23, 22, 19), (23, 11, 19)),
}


@pytest.fixture
def thin_slabs(monkeypatch):
    """Every task sweeps its region in the thinnest slabs the alignment allows (on
    these small volumes the planner would rather run each region whole)."""
    def thinnest(graph, stage, shapes, target, unit, limit=None):  # stages are frozen: a new one
        if stage.chunk_shape[0] > unit and stage.program.order:
            return dataclasses.replace(stage, slab=unit,
                                       peak_bytes=PLAN.sweep_bytes(graph, stage, shapes, unit)[1])
        return stage
    monkeypatch.setattr(PLAN, "choose_slab", thinnest)


@pytest.mark.parametrize("keep", [None, 0, "4x", "64x"])  # 64x: barriers read kept tensors
@pytest.mark.parametrize("name", list(CASES))
def test_swept_tasks_equal_the_whole_volume_forward(thin_slabs, name, keep):
    make, shape, chunks = CASES[name]
    model = make()
    vol = random_volume(shape, seed=7)
    plan = volarray.plan(model, vol, chunks=chunks, keep=keep)
    slabs = [s.slab for s in plan.stages] + [b.slab for b in plan.barriers]
    assert any(s is not None for s in slabs), str(plan)  # the sweep is what runs
    ref = whole_volume(model, vol)
    for scheduler in ("sync", "threads"):
        y = volarray.predict(model, vol, chunks=chunks, keep=keep).compute(scheduler=scheduler)
        assert_volume_close(y, ref, atol=1e-5)


def test_sweep_reuses_rows_instead_of_recomputing(monkeypatch, thin_slabs):
    """The sweep computes each node's rows once: the conv runs over exactly the rows of
    the whole region, however many slabs there are."""
    from volarray.ops.conv import Conv
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1),
                                torch.nn.Conv3d(2, 1, 5, padding=2)).eval()
    vol = random_volume((40, 9, 11), seed=1)
    rows = []
    run = Conv.run

    def counting(self, ctx, inputs, out, **kw):
        rows.append(out.shape[0])
        return run(self, ctx, inputs, out, **kw)
    monkeypatch.setattr(Conv, "run", counting)
    plan = volarray.plan(model, vol, chunks=(40, 9, 11), keep=0)
    assert plan.stages[0].slab is not None and plan.stages[0].slab < 40
    y = volarray.predict(model, vol, chunks=(40, 9, 11), keep=0).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)
    assert len(rows) > 2 and sum(rows) == 40 + 40  # each conv's 40 rows, once


@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_swept_borders_that_wrap_or_mirror(thin_slabs, mode):
    """Circular padding makes the first slab read the far end of the axis: held rows
    then reach past what the next slab needs."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1, padding_mode=mode),
                                torch.nn.ReLU(inplace=True),
                                torch.nn.Conv3d(4, 2, 5, padding=2, padding_mode=mode)).eval()
    vol = random_volume((37, 12, 10), seed=4)
    plan = volarray.plan(model, vol, chunks=(37, 12, 10), keep=0)
    assert plan.stages[0].slab is not None, str(plan)
    y = volarray.predict(model, vol, chunks=(37, 12, 10), keep=0).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


def test_held_rows_are_copied_once_per_slab():
    """A node that holds many rows between slabs (a skip tensor, held while its decoder
    lags) gets room for the next slab when it lets the rest go: the next slab's rows
    are written after the held ones, which are not copied again."""
    from volarray.geometry import Interval
    from volarray.program import RowBuffer
    cl = torch.channels_last_3d
    rows = torch.arange(2 * 10 * 3 * 4, dtype=torch.float32).reshape(1, 2, 10, 3, 4)
    buf = RowBuffer(rows[:, :, :6].contiguous(memory_format=cl), 0, None)
    buf.drop_below(2)  # holds rows 2..5, more than the slab's 4 new ones
    buf.compact(room=4)
    store = buf.store
    assert store.shape[2] == 8 and buf.rows == Interval(2, 6)
    buf.append(rows[:, :, 6:10].contiguous(memory_format=cl))
    assert buf.store is store  # written in place, held rows untouched
    assert torch.equal(buf.view(Interval(2, 10)), rows[:, :, 2:10])
    assert buf.view(Interval(2, 10)).is_contiguous(memory_format=cl)
    buf.drop_below(7)
    buf.append(rows[:, :, :2].contiguous(memory_format=cl) + 1000)  # no room: a new store
    assert buf.store is not store and buf.rows == Interval(7, 12)
    assert torch.equal(buf.view(Interval(7, 10)), rows[:, :, 7:10])
    assert torch.equal(buf.view(Interval(10, 12)), rows[:, :, :2] + 1000)
