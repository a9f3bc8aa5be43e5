"""What a swept task holds and moves between slabs: only the rows its consumers' new
rows read, in row buffers that slide without moving their rows every slab, and no
padded copy of a slab's input where the convolution can pad it."""
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import volarray
import volarray.costing as PLAN
import volarray.ops.fill as FILL
from volarray.geometry import Interval
from volarray.models import FaultSeg3D, seeded
from volarray.program import RowBuffer
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

CL = torch.channels_last_3d


def swept_plan(model, vol, rows):
    real = PLAN.choose_slab

    def fixed(graph, stage, shapes, target, unit, limit=None):
        if stage.chunk_shape[0] > rows and stage.program.order:
            return dataclasses.replace(stage, slab=rows)
        return stage
    PLAN.choose_slab = fixed
    try:
        return volarray.plan(model, vol, chunks=vol.shape, keep=0)
    finally:
        PLAN.choose_slab = real


def test_only_the_skip_holds_the_rows_its_decoder_lags_by():
    """FaultSeg3D's decoder reads its first skip tensor far behind the encoder: the skip
    holds those rows, the convolutions before it only their own halo."""
    model = seeded(FaultSeg3D)
    plan = swept_plan(model, random_volume((96, 16, 16)), 8)
    prog = plan.stages[0].program
    rows = prog.sweep_rows([Interval(i, i + 8) for i in range(0, 96, 8)])
    graph = plan.graph
    readers = graph.consumers()
    full_res = [n for n in prog.order if graph.nodes[n].shape[0] == 96
                and graph.nodes[n].channels == 16]
    skip = max(full_res, key=lambda n: len(readers[n]))  # read by the pool and the cat
    first = full_res[0]
    steady = rows[6]
    assert len(steady[first]) <= 8 + 2  # its new rows and a 3x3x3 conv's halo
    assert len(steady[skip]) > 40  # the rows between the decoder and the encoder


def test_held_rows_slide_in_one_store():
    """A buffer holding many more rows than a slab adds (a skip): after the first
    slab no store is allocated, and its rows move back to the front only when the
    window reaches the store's end, at most once per slab on average."""
    rows = torch.arange(2 * 200 * 3 * 4, dtype=torch.float32).reshape(1, 2, 200, 3, 4)
    buf = RowBuffer(rows[:, :, :40].contiguous(memory_format=CL), 0, None)
    held, new, stores, moved = 30, 4, set(), 0
    end = 40
    while end + new <= 200:
        buf.drop_below(end - held)
        before = buf.store.data_ptr() if buf.owned else None
        start = buf.start
        buf.compact(room=new, spare=held + new)
        if before == buf.store.data_ptr() and buf.start != start:
            moved += held
        stores.add(buf.store.data_ptr())
        buf.append(rows[:, :, end:end + new].contiguous(memory_format=CL))
        end += new
        view = buf.view(Interval(end - held - new, end))
        assert torch.equal(view, rows[:, :, end - held - new:end])
        assert view.is_contiguous(memory_format=CL)
    slabs = (200 - 40) // new
    assert len(stores) == 1  # one store after the first slab's tensor
    assert 0 < moved <= slabs * new  # each row moved at most once, amortised


def test_a_view_handed_out_is_not_overwritten():
    """Rows another node still reads this slab (a ReLU passed on as a view) are not
    the destination of the slide: the rows go to a new store instead."""
    rows = torch.arange(2 * 20 * 3 * 4, dtype=torch.float32).reshape(1, 2, 20, 3, 4)
    buf = RowBuffer(rows[:, :, :4].contiguous(memory_format=CL), 0, None)
    buf.compact(room=4, spare=4)  # a store of 12 rows, 4 held
    buf.append(rows[:, :, 4:8].contiguous(memory_format=CL))
    store = buf.store
    alias = buf.view(Interval(1, 5))  # read by another node for the rest of the slab
    seen = alias.clone()
    buf.drop_below(5)
    buf.compact(room=5)  # sliding its 3 rows to the front would write over the view
    assert torch.equal(alias, seen)
    assert buf.store is not store
    assert torch.equal(buf.view(Interval(5, 8)), rows[:, :, 5:8])


def test_the_first_and_last_slabs_are_padded_by_the_conv(monkeypatch):
    """A zero-padded conv pads a slab's one-sided z border itself: no padded copy of
    its input (`fill.pad_constant`) in a swept task of zero-padded convolutions, and the same
    result as the whole-volume forward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv3d(4, 4, 5, padding=2),
                                torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    vol = random_volume((40, 12, 10), seed=2)
    monkeypatch.setattr(PLAN, "choose_slab", lambda g, st, sh, t, u, lim=None: (
        dataclasses.replace(st, slab=8) if st.chunk_shape[0] > 8 else st))
    assert volarray.plan(model, vol, chunks=vol.shape, keep=0).stages[0].slab == 8
    pads, real = [], FILL.pad_constant
    monkeypatch.setattr(FILL, "pad_constant", lambda *a, **k: pads.append(1) or real(*a, **k))
    y = volarray.predict(model, vol, chunks=vol.shape, keep=0).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)
    assert not pads


@pytest.mark.parametrize("rows", [4, 8])
def test_a_swept_unet_equals_its_whole_forward_bit_for_bit(rows):
    """The rows a sweep computes are the rows the whole region computes: the same
    bits, whatever the slab."""
    model = seeded(FaultSeg3D)
    vol = random_volume((48, 24, 32), seed=5)
    real = PLAN.choose_slab
    try:
        PLAN.choose_slab = lambda g, st, sh, t, u, lim=None: st
        whole = volarray.predict(model, vol, chunks=vol.shape, keep=0).compute(
            scheduler="sync")
        PLAN.choose_slab = lambda g, st, sh, t, u, lim=None: (
            dataclasses.replace(st, slab=rows) if st.chunk_shape[0] > rows else st)
        plan = volarray.plan(model, vol, chunks=vol.shape, keep=0)
        assert plan.stages[0].slab == rows
        swept = volarray.predict(model, vol, chunks=vol.shape, keep=0).compute(
            scheduler="sync")
    finally:
        PLAN.choose_slab = real
    assert (swept.view("u4") == whole.view("u4")).all()


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6),
                       st.integers(1, 6)),
       lo=st.tuples(*[st.integers(0, 3)] * 3), hi=st.tuples(*[st.integers(0, 3)] * 3),
       value=st.sampled_from([0.0, -1.5, float("-inf")]), crop=st.booleans())
def test_a_constant_border_is_what_f_pad_gives(shape, lo, hi, value, crop):
    """The tiles' constant padding (one channels-last copy) equals F.pad's, on a
    strided crop as on a whole tensor."""
    t = torch.randn((1,) + shape).contiguous(memory_format=torch.channels_last_3d)
    if crop:
        t = t[:, :, :, 1:] if shape[2] > 1 else t[:, :, 1:]
    pads = [p for a, b in zip(reversed(lo), reversed(hi)) for p in (a, b)]
    got = FILL.pad_constant(t, lo, hi, value)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(got, torch.nn.functional.pad(t, pads, value=value))
