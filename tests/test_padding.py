"""Volumes whose sides the model cannot take: the error says why, padding fixes it."""
import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn as nn

import volarray
import volarray.padding
from volarray.models import FaultSeg3D, seeded
from volarray.padding import (crop_output, pad_volume, padded_shape, required_multiple)
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=4)


class AnisoUNet(nn.Module):
    """Pools y and x by 4 and z not at all, then concatenates the upsampled level."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv3d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool3d((1, 4, 4))
        self.up = nn.Upsample(scale_factor=(1, 4, 4), mode="nearest")
        self.head = nn.Conv3d(4, 1, 1)

    def forward(self, x):
        c = self.enc(x)
        return self.head(torch.cat([self.up(self.pool(c)), c], dim=1))


def test_message_names_multiple_sides_and_pad(model):
    with pytest.raises(volarray.InputError) as e:
        volarray.predict(model, np.zeros((100, 100, 100), np.float32))
    msg = str(e.value)
    assert "\n" not in msg
    assert "volume shape (100, 100, 100)" in msg
    assert "sides 100, 100, 100 are not multiples of 8" in msg
    assert "FaultSeg3D needs (it downsamples by 8)" in msg
    assert "pad='reflect' or pad='zeros'" in msg and "(104, 104, 104)" in msg
    assert "crop the volume to (96, 96, 96)" in msg
    assert "cannot place" not in msg


def test_message_names_only_the_bad_axes(model):
    with pytest.raises(volarray.InputError,
                       match=r"sides y=20, x=30 are not multiples of 8.*pad='reflect'"
                             r".*\(16, 24, 32\)") as e:
        volarray.plan(model, np.zeros((16, 20, 30), np.float32))
    assert "z=" not in str(e.value)
    with pytest.raises(volarray.InputError, match=r"side y=20 is not a multiple of 8.*pad="):
        volarray.predict(model, np.zeros((24, 20, 16), np.float32))


def test_per_axis_multiple():
    m = AnisoUNet().eval()
    assert required_multiple(m, 1, (9, 10, 10)) == (1, 4, 4)
    assert required_multiple(m, 1, (9, 12, 8)) is None
    with pytest.raises(volarray.InputError, match=r"sides y=10, x=10 are not multiples of 4, "
                                                  r"which AnisoUNet needs \(it downsamples by 4\)"
                                                  r".*\(9, 12, 12\)"):
        volarray.predict(m, np.zeros((9, 10, 10), np.float32))


def test_required_multiple(model):
    assert required_multiple(model, 1, (16, 16, 16)) is None
    assert required_multiple(model, 1, (24, 8, 40)) is None
    assert required_multiple(model, 1, (100, 100, 100)) == (8, 8, 8)
    assert required_multiple(model, 1, (16, 20, 30)) == (8, 8, 8)
    assert required_multiple(model, 2, (16, 20, 30)) is None  # wrong channels: no multiple helps


def test_other_failures_keep_their_errors(model):
    with pytest.raises(volarray.TraceError, match=r"the volume has 2 \(shape \(2, 20, 20, 20\)\)"):
        volarray.predict(model, random_volume((2, 20, 20, 20)))


def test_successful_trace_does_not_probe(model, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("probed on the successful path")
    monkeypatch.setattr(volarray.padding, "padding_error", fail)
    monkeypatch.setattr(volarray.padding, "required_multiple", fail)
    volarray.plan(model, np.zeros((16, 24, 8), np.float32), chunks=8)


def test_padded_shape():
    assert padded_shape((100, 100, 100), 8) == (104, 104, 104)
    assert padded_shape((16, 20, 30), 8) == (16, 24, 32)
    assert padded_shape((9, 10, 10), (1, 4, 4)) == (9, 12, 12)
    with pytest.raises(volarray.InputError, match="multiple=0"):
        padded_shape((8, 8, 8), 0)


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_pad_volume_matches_numpy(mode, np_mode):
    vol = random_volume((2, 20, 27, 30))
    arr = da.from_array(vol, chunks=(2, 8, 16, 16))
    padded = pad_volume(arr, 8, mode)
    assert padded.shape == (2, 24, 32, 32)
    assert padded.chunks[1:] == ((8, 8, 8), (16, 16), (16, 16))
    np.testing.assert_array_equal(
        padded.compute(), np.pad(vol, [(0, 0), (0, 4), (0, 5), (0, 2)], mode=np_mode))
    assert pad_volume(arr, (4, 1, 2), mode).shape == (2, 20, 27, 30)


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_pad_predict_crop_equals_torch(model, mode, np_mode):
    vol = random_volume((20, 27, 30))
    multiple = required_multiple(model, 1, vol.shape)
    assert multiple == (8, 8, 8)
    padded = pad_volume(da.from_array(vol[None], chunks=(1, 8, 16, 16)), multiple, mode)
    y = crop_output(volarray.predict(model, padded, chunks=16), vol.shape, padded.shape)
    assert y.shape == (1, 20, 27, 30)
    ref = whole_volume(model, np.pad(vol, [(0, 4), (0, 5), (0, 2)], mode=np_mode))
    assert_volume_close(y, ref[:, :20, :27, :30])


def test_crop_output_rule():
    y = da.zeros((3, 24, 32, 32), chunks=8)
    assert crop_output(y, (20, 27, 30), (24, 32, 32)).shape == (3, 20, 27, 30)
    half = da.zeros((3, 12, 16, 16), chunks=8)  # half resolution: ceil(n / 2)
    assert crop_output(half, (1, 20, 27, 30), (1, 24, 32, 32)).shape == (3, 10, 14, 15)
    double = da.zeros((3, 48, 64, 64), chunks=8)
    assert crop_output(double, (20, 27, 30), (24, 32, 32)).shape == (3, 40, 54, 60)
    with pytest.raises(volarray.InputError, match="not a rescaling"):
        crop_output(da.zeros((1, 20, 32, 32)), (20, 27, 30), (24, 32, 32))


def test_bad_mode_and_short_sides():
    arr = da.zeros((1, 20, 27, 30), chunks=8)
    with pytest.raises(volarray.InputError, match=r"pad='wrap'.*'reflect'.*'zeros'"):
        pad_volume(arr, 8, "wrap")
    with pytest.raises(volarray.InputError, match=r"pad='reflect'.*x=3 by 5.*pad='zeros'"):
        pad_volume(da.zeros((1, 8, 8, 3)), 8, "reflect")
    assert pad_volume(da.zeros((1, 8, 8, 3)), 8, "zeros").shape == (1, 8, 8, 8)


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_predict_pad_keyword(model, mode, np_mode):
    vol = random_volume((20, 27, 30))
    y = volarray.predict(model, vol, chunks=16, pad=mode)
    ref = whole_volume(model, np.pad(vol, [(0, 4), (0, 5), (0, 2)], mode=np_mode))
    assert_volume_close(y, ref[:, :20, :27, :30])
