"""Sliding-window mode equals MONAI's sliding_window_inference, aggregated per chunk."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import volarray
from volarray.models import MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume

def monai(model, vol, roi, overlap, mode, sigma_scale=0.125):
    """MONAI's answer; the test that asks for it is skipped where MONAI is missing (the
    tests that do not compare with MONAI run anyway)."""
    monai_inferers = pytest.importorskip("monai.inferers")
    with torch.inference_mode():
        return monai_inferers.sliding_window_inference(
            torch.from_numpy(vol)[None, None], roi, 1, model, overlap=overlap, mode=mode,
            sigma_scale=sigma_scale)[0].numpy()


@pytest.fixture(scope="module")
def model():
    return seeded(MultiScaleNet)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize("shape,roi,chunks", [
    ((40, 52, 33), (16, 20, 24), (13, 17, 11)),  # non-cubic, uneven chunks
    ((10, 30, 12), (16, 16, 16), (7, 8, 9)),     # smaller than the window on two axes
])
def test_window_equals_monai(model, blend, overlap, shape, roi, chunks):
    vol = random_volume(shape, seed=1)
    out = volarray.predict(model, vol, method="window", roi_size=roi, overlap=overlap, blend_mode=blend,
                           chunks=chunks)
    assert out.chunks[1:] == tuple(tuple(np.diff(list(range(0, n, c)) + [n])) for n, c in
                                   zip(shape, chunks))
    assert_volume_close(out.compute(scheduler="threads"), monai(model, vol, roi, overlap, blend),
                        atol=1e-5)


def test_window_sigma_scale_and_callable_blend(model):
    vol = random_volume((30, 26, 20), seed=2)
    out = volarray.predict(model, vol, method="window", roi_size=12, sigma_scale=0.25).compute()
    assert_volume_close(out, monai(model, vol, 12, 0.25, "gaussian", 0.25), atol=1e-5)
    ones = volarray.predict(model, vol, method="window", roi_size=12,
                            blend_mode=lambda shape: np.ones(shape)).compute()
    assert_volume_close(ones, monai(model, vol, 12, 0.25, "constant"), atol=1e-5)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; window mode does not need to."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return torch.relu(y)
        return torch.sigmoid(y)


def test_untraceable_model_in_window_mode():
    torch.manual_seed(0)
    model = Untraceable().eval()
    vol = random_volume((20, 24, 18), seed=3)
    with pytest.raises(volarray.TraceError):
        volarray.predict(model, vol)
    out = volarray.predict(model, vol, method="window", roi_size=(8, 12, 10), chunks=7)
    assert_volume_close(out.compute(), monai(model, vol, (8, 12, 10), 0.25, "gaussian"))


def test_window_task_memory_is_local(model):
    """No task holds the whole output: each blend task reads only the windows it overlaps."""
    vol = random_volume((48, 48, 48), seed=4)
    y = volarray.predict(model, vol, method="window", roi_size=16, chunks=16)
    graph = dict(y.__dask_graph__())
    blends = [v for k, v in graph.items() if isinstance(k, tuple) and k[0] == y.name]
    windows = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("volarray-window-")]
    assert len(blends) == 27 and len(windows) > 27
    assert max(len(task[-1]) for task in blends) <= 27  # windows per chunk, not all of them


def test_window_errors(model):
    vol = random_volume((12, 12, 12))
    with pytest.raises(volarray.InputError, match="roi_size="):
        volarray.predict(model, vol, method="window")
    with pytest.raises(volarray.InputError, match="overlap=1.5"):
        volarray.predict(model, vol, method="window", roi_size=8, overlap=1.5)
    with pytest.raises(volarray.InputError, match="blend_mode='fancy'"):
        volarray.predict(model, vol, method="window", roi_size=8, blend_mode="fancy")


def test_window_placement_callable(model):
    """Another tool's tile starts (volarray.nnunet passes nnU-Net's), checked to cover."""
    import dask.array as da

    from volarray.window import predict_window, scan_starts
    vol = da.from_array(random_volume((1, 30, 26, 20), seed=2), chunks=(1, 11, 13, 20))
    same = predict_window(model, vol, roi_size=12, chunks=(10, 10, 10),
                          placement=lambda n, r: scan_starts(n, r, 0.25))
    assert_volume_close(same.compute(),
                        predict_window(model, vol, roi_size=12, chunks=(10, 10, 10)).compute(),
                        atol=0)
    halves = predict_window(model, vol, roi_size=12, placement=lambda n, r: range(0, n - r + 1, 6)
                            if (n - r) % 6 == 0 else list(range(0, n - r, 6)) + [n - r])
    assert_volume_close(halves.compute(), monai(model, vol[0].compute(), 12, 0.5, "gaussian"),
                        atol=1e-5)
    with pytest.raises(volarray.InputError, match=r"window starts \[0\] .* cover the axis"):
        predict_window(model, vol, roi_size=12, placement=lambda n, r: [0])
    with pytest.raises(volarray.InputError, match="placement='nnunet'"):
        predict_window(model, vol, roi_size=12, placement="nnunet")


@pytest.mark.parametrize("mode", ["exact", "window"])
def test_tta_flips_equals_mean_of_flipped_forwards(model, mode):
    import itertools
    vol = random_volume((15, 22, 19), seed=6)
    kw = dict(roi_size=(8, 12, 10)) if mode == "window" else {}
    out = volarray.predict(model, vol, method=mode, tta="flips", chunks=(7, 9, 8), **kw).compute()
    ref = 0
    for flips in itertools.product((False, True), repeat=3):
        axes = tuple(i for i, f in enumerate(flips) if f)
        v = np.ascontiguousarray(np.flip(vol, axes)) if axes else vol
        if mode == "window":
            y = monai(model, v, (8, 12, 10), 0.25, "gaussian")
        else:
            with torch.inference_mode():
                y = model(torch.from_numpy(v)[None, None])[0].numpy()
        ref = ref + (np.flip(y, tuple(a + 1 for a in axes)) if axes else y)
    assert_volume_close(out, ref / 8, atol=1e-5)
    with pytest.raises(volarray.InputError, match="tta='rot45'"):
        volarray.predict(model, vol, tta="rot45")
