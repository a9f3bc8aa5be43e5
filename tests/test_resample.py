"""volarray.resample against nnU-Net's own resampling functions, on odd shapes and uneven
chunks: the same numbers (float64 rounding, within one float32 unit), lazily, each
output region reading only the input region its kernel needs."""
import itertools
import threading

import dask.array as da
import numpy as np
import pytest

import volarray
from volarray.resample import (Resampling, Scheme, compute_new_shape, raw_scan, resample,
                               resample_axis, separate_axis)

default_resampling = pytest.importorskip(
    "nnunetv2.preprocessing.resampling.default_resampling")


def nnunet(x, shape, spacing, new_spacing, order=3, order_z=0, force=None):
    return default_resampling.resample_data_or_seg_to_shape(
        x.copy(), shape, spacing, new_spacing, False, order, order_z, force)


def assert_same(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    # float64 sums in another order: at most one float32 unit apart, mostly bitwise
    assert np.abs(ours - ref).max() <= 2 ** -22 * max(1.0, np.abs(ref).max())
    assert (ours == ref).mean() >= 0.99


CASES = [  # shape (C, Z, Y, X), spacing, new spacing, order, order_z, force_separate_z
    ((2, 16, 30, 25), (2.5, 0.8, 0.8), (1, 1, 1), 3, 0, None),   # raw scan -> plans: separate z
    ((3, 40, 24, 20), (1, 1, 1), (2.5, 0.8, 0.8), 1, 0, None),   # logits back
    ((1, 13, 29, 22), (1.3, 0.7, 1.1), (1, 1, 1), 3, 0, None),   # 3-D order 3, up and down
    ((1, 31, 17, 45), (0.8, 0.8, 3.0), (1, 1, 1), 3, 1, None),   # low-res last axis, order_z 1
    ((1, 9, 23, 19), (1, 1, 1), (0.7, 0.6, 0.9), 3, 0, True),    # forced separate z
    ((1, 11, 14, 26), (1, 1, 1), (1, 1, 0.45), 3, 0, False),     # one axis only
]


@pytest.mark.parametrize("shape,spacing,new,order,order_z,force", CASES)
def test_equals_nnunet(shape, spacing, new, order, order_z, force):
    x = np.random.default_rng(sum(shape)).normal(5, 30, shape).astype(np.float32)
    new_shape = compute_new_shape(shape[1:], spacing, new)
    assert new_shape == tuple(default_resampling.compute_new_shape(shape[1:], spacing, new))
    ref = nnunet(x, new_shape, spacing, new, order, order_z, force)
    y = resample(da.from_array(x, chunks=(1, 7, 11, 13)), new_shape, spacing, new,
                 Scheme(order, order_z, force), chunk=13)
    assert isinstance(y, da.Array) and y.chunks[1][0] == min(13, new_shape[0])
    assert_same(y.compute(), ref)


def test_long_axis_and_unchanged_shape():
    """A 150-voxel axis in 7-voxel chunks: the spline prefilter's truncation is
    invisible. The same shape is returned untouched, as nnU-Net returns it."""
    x = np.random.default_rng(1).normal(0, 1, (1, 150, 6, 5)).astype(np.float32)
    ref = nnunet(x, (58, 6, 5), (0.5, 1, 1), (1.3, 1, 1))
    assert_same(resample(da.from_array(x, chunks=(1, 10, 6, 5)), (58, 6, 5), (0.5, 1, 1),
                         (1.3, 1, 1), chunk=7).compute(), ref)
    d = da.from_array(x)
    assert resample(d, x.shape[1:], (1, 1, 1), (2, 2, 2)) is d


def test_lazy_limits():
    """eager=False (the logits' way back): the clip's min and max wait for compute."""
    x = np.random.default_rng(4).normal(0, 3, (2, 12, 10, 9)).astype(np.float32)
    ref = nnunet(x, (15, 7, 13), (1, 1, 1), (0.8, 1.4, 0.7))
    calls = []
    d = da.from_array(x, chunks=5).map_blocks(lambda b: calls.append(b.size) or b,
                                              dtype=x.dtype)
    y = resample(d, (15, 7, 13), (1, 1, 1), (0.8, 1.4, 0.7), eager=False)
    assert not any(calls)  # dask's meta probe only
    assert_same(y.compute(), ref)


def test_separate_axis_as_nnunet():
    values = (0.5, 0.8, 1.0, 2.5, 3.0, 5.0)
    for spacing in itertools.product(values, repeat=3):
        for new in ((1, 1, 1), (3.0, 0.8, 0.8), (0.7, 0.7, 2.2)):
            for force in (None, True, False):
                sep, axis = default_resampling.determine_do_sep_z_and_axis(force, spacing, new)
                assert separate_axis(spacing, new, force) == (axis if sep else None)


def test_each_output_region_reads_its_kernel_only():
    """An output chunk at the start of a 400-voxel axis computes only the input chunks
    its weights reach (order 3: the kernel plus ~35 voxels of prefilter), nothing is
    computed before it is asked for, and order 1 reads two neighbours only."""
    computed = []
    lock = threading.Lock()

    def record(block, block_info=None):
        with lock:
            computed.append(block_info[0]["chunk-location"][1])
        return block

    x = da.random.default_rng(2).normal(size=(1, 400, 4, 4), chunks=(1, 20, 4, 4))
    x = x.map_blocks(record, dtype=x.dtype)
    for order, chunks_read in ((3, 4), (1, 2)):  # output 0-19 is input 0-31
        y = resample_axis(x, 1, 250, order, chunk=20)
        assert not computed
        y.blocks[0, 0].compute()
        assert sorted(set(computed)) == list(range(chunks_read)), order
        computed.clear()


def test_resampling_for_a_transposed_configuration():
    """The plans' spacing is in nnU-Net's transposed order; the scan stays in its own."""
    tf = (2, 0, 1)
    config = {"spacing": [1.0, 0.9, 1.2], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                            "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None}}
    spacing = (0.7, 0.7, 2.6)  # the scan's own order; nnU-Net sees (2.6, 0.7, 0.7)
    x = np.random.default_rng(3).normal(0, 5, (1, 19, 23, 9)).astype(np.float32)
    r = Resampling.for_configuration(config, tf, spacing, x.shape[1:])
    xt = x.transpose(0, *[t + 1 for t in tf])
    sp_t = [spacing[t] for t in tf]
    new_t = default_resampling.compute_new_shape(xt.shape[1:], sp_t, config["spacing"])
    ref = nnunet(xt, new_t, sp_t, config["spacing"]).transpose(0, *[t + 1 for t in np.argsort(tf)])
    ours = r.forward(da.from_array(x, chunks=8)).compute()
    assert_same(ours, ref)
    back = nnunet(ref.transpose(0, *[t + 1 for t in tf]), xt.shape[1:], config["spacing"], sp_t,
                  order=1).transpose(0, *[t + 1 for t in np.argsort(tf)])
    assert_same(r.backward(da.from_array(ours, chunks=8)).compute(), back)


def test_refusals():
    with pytest.raises(volarray.InputError, match=r"spacing=\(1, 0, 1\).*three positive"):
        raw_scan(np.zeros((4, 4, 4)), spacing=(1, 0, 1))
    with pytest.raises(volarray.InputError, match="'resample_torch_fornnunet'.*spacing="):
        Scheme.from_plans("resample_torch_fornnunet", {}, "the data")
    with pytest.raises(volarray.InputError, match="is_seg=True"):
        Scheme.from_plans("resample_data_or_seg_to_shape", {"is_seg": True}, "the data")
    with pytest.raises(volarray.InputError, match="empty shape"):
        resample(da.zeros((1, 2, 4, 4)), (0, 4, 4), (0.1, 1, 1), (5, 1, 1))
