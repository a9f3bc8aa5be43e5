"""normalize=: whole-volume statistics (dask reductions) against numpy on the whole array,
applied pointwise in every task; integer volumes cast to float32 region by region."""
import dask.array as da
import numpy as np
import pytest
import torch
import zarr

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.normalize import Normalization, percentile_of_histogram


def identity():
    """A 1x1x1 convolution of weight 1: the model's input (the normalized volume) itself."""
    conv = torch.nn.Conv3d(1, 1, 1, bias=False)
    torch.nn.init.ones_(conv.weight)
    return conv.eval()


IDENTITY = identity()


def survey(shape=(37, 30, 26), seed=0):
    """Seismic-like amplitudes with an offset and heavy tails."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, shape) * 900 + 2500).astype(np.float32)


def test_zscore_equals_numpy_float64_on_the_whole_array():
    vol = survey()
    arr = da.from_array(vol, chunks=(11, 17, 9))
    z = volarray.predict(IDENTITY, arr, chunks=(11, 17, 9),
                         normalize="zscore").compute()[0]
    x = vol.astype(np.float64)
    want = (x - x.mean()) / x.std(ddof=0)
    assert np.abs(z - want).max() <= 1e-5 * np.abs(want).max()
    stats = volarray.normalization(arr)
    assert stats.mean[0] == pytest.approx(x.mean(), rel=1e-12)
    assert stats.std[0] == pytest.approx(x.std(), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int16])
def test_percentiles_within_a_thousandth_of_the_range(dtype):
    """Percentiles from a histogram of the whole volume: exact for integers, within 0.1%
    of the data range (here far nearer) for floats; then the clipped volume z-scored."""
    vol = survey(seed=3)
    if dtype != np.float32:
        vol = np.clip(vol, 0 if dtype == np.uint16 else -30000, 30000).astype(dtype)
    stats = volarray.normalization(da.from_array(vol, chunks=(9, 13, 26)), "percentile")
    x = vol.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    span = x.max() - x.min()
    tol = 0 if dtype != np.float32 else 1e-3 * span
    assert abs(stats.clip[0][0] - lo) <= tol + 1e-9 and abs(stats.clip[0][1] - hi) <= tol + 1e-9
    c = np.clip(x, *stats.clip[0])
    assert stats.mean[0] == pytest.approx(c.mean(), rel=1e-10)
    assert stats.std[0] == pytest.approx(c.std(), rel=1e-10)
    other = volarray.normalization(vol, {"percentiles": (2, 98)})
    assert abs(other.clip[0][0] - np.percentile(x, 2)) <= tol + 1e-9


def test_percentile_of_histogram_interpolates_as_numpy():
    rng = np.random.default_rng(1)
    values = rng.integers(-5, 40, 1001)
    counts, edges = np.histogram(values, bins=45, range=(-5.5, 39.5))
    for q in (0, 0.5, 13.7, 50, 99.5, 100):
        assert percentile_of_histogram(counts, edges, q, True) == pytest.approx(
            np.percentile(values, q), abs=1e-12)


def test_given_statistics_clip_then_zscore_nnunet_ct():
    """nnU-Net's CT scheme: clip to the training set's percentiles, z-score with its mean
    and std (not the volume's)."""
    vol = survey(seed=2)
    got = volarray.predict(IDENTITY, vol, chunks=16,
                           normalize={"mean": 100.0, "std": 400.0, "clip": (-1000, 3000)})
    want = (np.clip(vol.astype(np.float64), -1000, 3000) - 100) / 400
    assert np.abs(got.compute()[0] - want).max() < 1e-6


def test_exact_prediction_of_a_normalized_zarr_uint16_stack(tmp_path):
    """A uint16 zarr stack, z-scored over the whole volume, read straight from the store
    by every task: equals the model on numpy's normalized float32 whole volume."""
    vol = (survey((40, 32, 24), seed=5) - survey((40, 32, 24), seed=5).min()).astype(np.uint16)
    z = zarr.create_array(str(tmp_path / "ct.zarr"), shape=vol.shape, chunks=(16, 16, 16),
                          dtype="u2")
    z[...] = vol
    model = seeded(FaultSeg3D)
    x = vol.astype(np.float64)
    normed = ((x - x.mean()) / x.std()).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(normed)[None, None])[0].numpy()
    got = volarray.predict(model, zarr.open_array(str(tmp_path / "ct.zarr"), mode="r"),
                           chunks=(20, 16, 13), normalize="zscore")
    assert got.dtype == np.float32
    assert np.abs(got.compute(scheduler="sync") - want).max() < 1e-5
    # integers are cast to float32, normalized or not
    raw = volarray.predict(IDENTITY, vol, chunks=16).compute()
    assert raw.dtype == np.float32 and np.array_equal(raw[0], vol.astype(np.float32))


def test_statistics_recorded_in_the_outputs(tmp_path):
    import xarray as xr
    vol = survey(seed=4)
    out = volarray.predict_to_zarr(IDENTITY, vol, str(tmp_path / "o.zarr"),
                                   chunks=16, normalize="zscore")
    assert out.attrs["normalize"] == "zscore"
    assert out.attrs["normalize_mean"] == [pytest.approx(float(vol.astype(np.float64).mean()))]
    da_ = xr.DataArray(vol, dims=("time", "crossline", "inline"), name="amp")
    res = da_.volinfer.predict(IDENTITY, chunks=16, normalize="percentile")
    assert res.attrs["normalize"] == "percentile" and len(res.attrs["normalize_clip"]) == 1


def test_a_pointwise_callable_runs_per_region_and_a_per_chunk_one_is_refused():
    vol = survey(seed=6)
    got = volarray.predict(IDENTITY, vol, chunks=16,
                           normalize=lambda b: np.log1p(np.abs(b))).compute()[0]
    assert np.allclose(got, np.log1p(np.abs(vol)), rtol=1e-6)
    with pytest.raises(volarray.InputError, match="not pointwise"):
        volarray.predict(IDENTITY, vol, chunks=16,
                         normalize=lambda b: (b - b.mean()) / b.std())


@pytest.mark.parametrize("bad,match", [
    ("minmax", "not one of"),
    ({"mean": 0.0}, "give 'mean' and 'std'"),
    ({"mean": 0.0, "std": 0.0}, "must be > 0"),
    ({"mean": 0.0, "std": 1.0, "clip": (5, 1)}, "lo < hi"),
    ({"percentiles": (99, 1)}, "0 <= lo < hi <= 100"),
    ({"mean": [0.0, 1.0], "std": 1.0}, "one per channel"),
])
def test_bad_normalize_is_refused_naming_it(bad, match):
    with pytest.raises(volarray.InputError, match=match):
        volarray.predict(IDENTITY, np.ones((8, 8, 8), np.float32), normalize=bad)


def test_a_constant_volume_cannot_be_zscored():
    with pytest.raises(volarray.InputError, match="constant"):
        volarray.predict(IDENTITY, np.ones((8, 8, 8), np.float32),
                         normalize="zscore")


def test_normalization_is_pointwise_per_channel():
    n = Normalization(mean=(1.0, -2.0), std=(2.0, 4.0), clip=((0.0, 5.0), (-10.0, 10.0)))
    block = np.array([[[[-1.0, 3.0, 9.0]]], [[[-20.0, 2.0, 30.0]]]], np.float32)
    assert np.allclose(n(block), [[[[-0.5, 1.0, 2.0]]], [[[-2.0, 1.0, 3.0]]]])


def test_per_channel_statistics_on_a_channel_chunked_store(tmp_path):
    """Three channels stored one per zarr chunk: each gets its own mean and std, on the
    reader path and on dask's."""
    rng = np.random.default_rng(7)
    vol = np.stack([rng.standard_normal((16, 16, 16)) * s + m
                    for m, s in ((0, 1), (500, 20), (-3, 0.1))]).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "c.zarr"), shape=vol.shape, chunks=(1, 8, 8, 8),
                          dtype="f4")
    z[...] = vol
    x = vol.astype(np.float64)
    want = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / x.std(axis=(1, 2, 3), keepdims=True)
    conv = torch.nn.Conv3d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1, 1))
    for volume in (zarr.open_array(str(tmp_path / "c.zarr"), mode="r"),
                   da.from_zarr(str(tmp_path / "c.zarr"))):
        got = volarray.predict(conv.eval(), volume, chunks=8, normalize="zscore").compute()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("normalize", ["zscore", "percentile",
                                       {"mean": (2500.0, -3.0), "std": (900.0, 0.5)}])
@pytest.mark.parametrize("method", ["exact", "window"])
def test_per_channel_schemes_on_a_stack_of_channels(normalize, method):
    """``da.stack([a, b])``: one channel per chunk; the same result as one channel chunk."""
    a, b = survey((24, 20, 16), seed=1), survey((24, 20, 16), seed=2) / 1000 - 5
    conv = torch.nn.Conv3d(2, 2, 1, bias=False).eval()
    kw = dict(chunks=8, method=method, normalize=normalize)
    if method == "window":
        kw["roi_size"] = (8, 8, 8)
    want = volarray.predict(conv, np.stack([a, b]), **kw).compute()
    got = volarray.predict(conv, da.stack([da.from_array(a, chunks=8), da.from_array(b, chunks=8)]),
                           **kw).compute()
    assert (got == want).all()


def test_a_callable_gets_float32_not_wrapping_integers():
    vol = np.full((16, 16, 16), 10, np.uint16)
    vol[8:] = 3000
    got = volarray.predict(IDENTITY, vol, chunks=8, normalize=lambda b: b - 1024).compute()[0]
    assert got.min() == -1014 and got.max() == 1976


def test_the_pointwise_probe_looks_past_a_constant_corner():
    vol = np.zeros((48, 48, 48), np.float32)
    vol[12:36, 12:36, 12:36] = np.random.default_rng(8).standard_normal((24, 24, 24))
    with pytest.raises(volarray.InputError, match="not pointwise"):
        volarray.predict(IDENTITY, vol, chunks=16, normalize=lambda b: b - b.mean())
