"""Output reductions and coordinate channels, in exact and window modes."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import volarray
from volarray.models import MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


@pytest.mark.parametrize("classes,dtype", [(5, np.uint8), (300, np.uint16)])
def test_argmax_labels_equal_whole_volume_argmax(classes, dtype):
    model = seeded(MultiScaleNet, classes=classes, width=4)
    vol = random_volume((13, 18, 15), seed=1)
    labels = volarray.predict(model, vol, output="argmax", chunks=(6, 7, 8))
    assert labels.dtype == dtype and labels.shape == vol.shape
    ref = whole_volume(model, vol)
    got = labels.compute()
    # ties aside, the same labels; where they differ the scores are equal to ~1e-6
    diff = got != ref.argmax(0)
    assert diff.mean() < 1e-3
    idx = np.nonzero(diff)
    assert np.allclose(ref[got[idx], *idx], ref.max(0)[idx], atol=1e-5)


def test_argmax_in_window_mode():
    model = seeded(MultiScaleNet)
    vol = random_volume((20, 22, 18), seed=2)
    scores = volarray.predict(model, vol, method="window", roi_size=10).compute()
    labels = volarray.predict(model, vol, method="window", roi_size=10, output="argmax").compute()
    np.testing.assert_array_equal(labels, scores.argmax(0))


class CoordNet(nn.Module):
    """Trained on coordinate-encoded patches: 1 amplitude + 3 coordinate channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("mode", ["exact", "window"])
def test_coords_are_global(mode):
    torch.manual_seed(0)
    model = CoordNet().eval()
    vol = random_volume((14, 21, 17), seed=3)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in vol.shape],
                       indexing="ij")
    full = np.stack([vol, *grid])
    kw = {"roi_size": (6, 8, 7)} if mode == "window" else {}
    out = volarray.predict(model, vol, coords=True, method=mode, chunks=(5, 8, 6), **kw).compute()
    if mode == "exact":
        ref = whole_volume(model, full)
    else:
        ref = volarray.predict(model, full, method="window", chunks=(5, 8, 6), **kw).compute()
    assert_volume_close(out, ref, atol=1e-5)


def test_output_errors():
    model = seeded(MultiScaleNet)
    with pytest.raises(volarray.InputError, match="output='labels'"):
        volarray.predict(model, random_volume((8, 8, 8)), output="labels")


class MCDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.b = nn.Conv3d(6, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout3d(self.drop(torch.relu(self.a(x))), 0.2,
                                                    training=True))


class NoisySampler(nn.Module):
    """A stochastic segmenter drawing noise in forward (untraceable for exact mode's
    purposes, fine in window mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.cat([x, torch.randn_like(x)], 1))


def test_ensemble_exact_reproducible_for_any_chunking():
    torch.manual_seed(0)
    model = MCDropout().eval()
    model.drop.train()  # MC dropout: left active on purpose
    vol = random_volume((12, 15, 13), seed=7)
    mean_a, std_a = volarray.predict(model, vol, ensemble=5, chunks=(5, 4, 7), seed=3)
    mean_b, std_b = volarray.predict(model, vol, ensemble=5, chunks=(12, 8, 6), seed=3)
    assert_volume_close(mean_a.compute(), mean_b.compute(), atol=1e-6)
    assert_volume_close(std_a.compute(), std_b.compute(), atol=1e-6)
    assert float(std_a.mean().compute()) > 1e-3  # the samples do differ
    # the mean of the samples, each one a whole prediction of its own
    # (one sample on its own: Exact.sample, what ensemble= draws, where dropout may be active)
    exact = volarray.Exact(model, chunks=6)
    singles = [exact.sample(vol, seed=3 + s).compute() for s in range(5)]
    assert_volume_close(mean_a.compute(), np.mean(singles, axis=0), atol=1e-5)
    assert_volume_close(std_a.compute(), np.std(singles, axis=0), atol=1e-5)


def test_ensemble_window_reproducible_for_any_chunking():
    torch.manual_seed(0)
    model = NoisySampler().eval()
    vol = random_volume((16, 18, 14), seed=8)
    a = volarray.predict(model, vol, method="window", roi_size=8, ensemble=4, chunks=5)
    b = volarray.predict(model, vol, method="window", roi_size=8, ensemble=4, chunks=(16, 9, 7))
    for x, y in zip(a, b):
        assert x.shape == (2, 16, 18, 14)
        assert_volume_close(x.compute(), y.compute(), atol=1e-6)
    assert float(a[1].mean().compute()) > 1e-3
    with pytest.raises(volarray.InputError, match="ensemble=1"):
        volarray.predict(model, vol, method="window", roi_size=8, ensemble=1)


def test_argmax_head_runs_in_class_blocks():
    """A 1000-class head: the plan holds labels, not 1000 scores per voxel."""
    model = seeded(MultiScaleNet, classes=1000, width=4)
    vol = random_volume((16, 16, 16), seed=9)
    fused = volarray.plan(model, vol, output="argmax", chunks=8)
    plain = volarray.plan(model, vol, chunks=8)
    assert fused.graph.nodes[fused.graph.output].channels == 1
    assert fused.peak_bytes < plain.peak_bytes / 4
    labels = volarray.predict(model, vol, output="argmax", chunks=8).compute()
    ref = whole_volume(model, vol)
    assert (labels == ref.argmax(0)).mean() > 0.999
