"""Kept tensors held compressed between stages: bit for bit, smaller, read by region."""
import numpy as np
import pytest
from dask.callbacks import Callback
from dask.sizeof import sizeof
from hypothesis import given, settings
from hypothesis import strategies as st

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.packed import PackedChunk, block_side, region

from conftest import whole_volume


def relu_like(shape, seed=0):
    a = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.maximum(a, 0)  # half zeros, as after a ReLU


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_region_comes_back_bit_for_bit(data):
    shape = (3,) + tuple(data.draw(st.integers(1, 23)) for _ in range(3))
    a = relu_like(shape)
    a[0, 0, 0, 0], a[-1, -1, -1, -1] = np.nan, -0.0  # whatever the bits, they come back
    packed = PackedChunk(a)
    slices = []
    for n in shape[1:]:
        lo = data.draw(st.integers(0, n - 1))
        slices.append(slice(lo, data.draw(st.integers(lo + 1, n))))
    got = region(packed, tuple(slices))
    want = a[(slice(None),) + tuple(slices)]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got.transpose(1, 2, 3, 0).flags.c_contiguous  # channels-last, as tiles run


def test_a_halo_read_decodes_only_the_blocks_it_touches(monkeypatch):
    a = relu_like((64, 32, 32, 32))
    packed = PackedChunk(a)
    assert block_side(64, 4) == 8 and len(packed.blocks) == 64
    assert sizeof(packed) == packed.nbytes < 0.6 * a.nbytes
    dense = PackedChunk(a + 1)  # no zeros: kept as it is
    assert a.nbytes <= dense.nbytes < 1.01 * a.nbytes
    decoded = []
    real = volarray.packed.decode
    monkeypatch.setattr(volarray.packed, "decode", lambda *a: decoded.append(1) or real(*a))
    region(packed, (slice(0, 3), slice(0, 32), slice(0, 32)))  # a 3-row halo
    assert len(decoded) == 16


@pytest.mark.parametrize("scheduler,pack_from", [("sync", 0), ("threads", 0),
                                                  ("sync", 1 << 30)])
def test_a_lazy_result_keeps_its_large_tensors_packed(scheduler, pack_from, monkeypatch):
    """Kept chunks of PACK_FROM_BYTES or more wait packed, smaller ones as they are
    (this grid's kept chunk is 430 kB: above a threshold of 0, below one of 1 GB)."""
    monkeypatch.setattr(volarray.packed, "PACK_FROM_BYTES", pack_from)
    model = seeded(FaultSeg3D)
    vol = np.random.default_rng(1).standard_normal((40, 48, 56)).astype(np.float32)
    plan = volarray.plan(model, vol, chunks=(16, 24, 32), keep="4x")
    assert len(plan.stages) > 1, str(plan)
    kept = {}

    class Spy(Callback):
        def _posttask(self, key, result, dsk, state, id):
            if any(f"volarray-stage-{s.index}-" in str(key) for s in plan.stages[:-1]):
                kept[key] = result
    with Spy():
        y = volarray.predict(model, vol, chunks=(16, 24, 32), keep="4x").compute(
            scheduler=scheduler)
    assert kept and all(isinstance(c, PackedChunk) == (pack_from == 0)
                        for c in kept.values())
    np.testing.assert_allclose(y, whole_volume(model, vol), atol=1e-5)
