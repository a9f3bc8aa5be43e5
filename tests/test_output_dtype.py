"""Outputs that do not dwarf the input: scores stored as float16 or as uint8
probabilities (scale 1/255 in the attributes, decoded by xarray), compressed by zarr's
default codec; a uint8 output of logits is refused, never wrapped."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
import zarr

import volarray
from volarray.models import FaultSeg3D, seeded

from conftest import random_volume, whole_volume


@pytest.fixture(scope="module")
def case():
    model = seeded(FaultSeg3D, width=4)  # sigmoid head: probabilities in [0, 1]
    vol = random_volume((16, 24, 16), seed=4)
    return model, vol, whole_volume(model, vol)


def test_float16_and_uint8_scores(case):
    model, vol, ref = case
    half = volarray.predict(model, vol, chunks=8, output_dtype="float16").compute()
    assert half.dtype == np.float16
    assert np.abs(half.astype(np.float32) - ref).max() <= 1e-3
    q = volarray.predict(model, vol, chunks=8, output_dtype="uint8").compute()
    assert q.dtype == np.uint8
    assert np.abs(q / 255 - ref).max() <= 0.5 / 255 + 1e-6
    torch.manual_seed(0)  # an ensemble samples a model with dropout left active
    dropout = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Dropout3d(0.2),
                                  torch.nn.Sigmoid()).eval()
    dropout[1].train()
    mean, std = volarray.predict(dropout, vol, chunks=8, ensemble=2, output_dtype="uint8")
    assert mean.dtype == std.dtype == np.uint8


def test_uint8_in_zarr_decodes_with_xarray_and_is_compressed(case, tmp_path):
    model, vol, ref = case
    small = volarray.predict_to_zarr(model, vol, tmp_path / "q.zarr", chunks=8,
                                     output_dtype="uint8")
    big = volarray.predict_to_zarr(model, vol, tmp_path / "f.zarr", chunks=8)
    assert small.dtype == np.uint8 and small.attrs["scale_factor"] == pytest.approx(1 / 255)
    assert "scale_factor" not in big.attrs
    decoded = xr.open_zarr(tmp_path / "q.zarr", consolidated=False)["prediction"].values
    assert np.abs(decoded - ref).max() <= 0.5 / 255 + 1e-6
    assert any("zstd" in type(c).__name__.lower() for c in small.compressors)
    size = lambda p: sum(f.stat().st_size for f in (tmp_path / p / "prediction").rglob("*")
                         if f.is_file())
    assert size("q.zarr") < size("f.zarr") / 3
    ds = xr.Dataset({"amp": (("z", "y", "x"), vol)})
    out = ds.volinfer.predict(model, var="amp", chunks=8, output_dtype="uint8")
    assert out["prediction"].dtype == np.uint8
    assert out["prediction"].attrs["scale_factor"] == pytest.approx(1 / 255)


def test_logits_as_uint8_and_labels_with_output_dtype_are_refused(case):
    model, vol, _ = case
    logits = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1)).eval()
    y = volarray.predict(logits, vol, chunks=8, output_dtype="uint8")
    with pytest.raises(volarray.InputError, match=r"probabilities in \[0, 1\].*float16"):
        y.compute()
    with pytest.raises(volarray.InputError, match="labels"):
        volarray.predict(logits, vol, output="argmax", output_dtype="uint8")
    with pytest.raises(volarray.InputError, match="output_dtype='int8'"):
        volarray.predict(model, vol, output_dtype="int8")


def test_cli_output_dtype(case, tmp_path):
    model, vol, ref = case
    torch.save(model.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "vol.npy", vol)
    (tmp_path / "mymodels.py").write_text(
        "from volarray.models import FaultSeg3D\ndef small():\n    return FaultSeg3D(width=4)\n")
    r = subprocess.run([sys.executable, "-m", "volarray.cli", "predict", "vol.npy", "out.zarr",
                        "--model", "mymodels:small", "--weights", "w.pt", "--chunks", "8",
                        "--output-dtype", "uint8"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    q = zarr.open_group(str(tmp_path / "out.zarr"))["prediction"]
    assert q.dtype == np.uint8
    assert np.abs(q[:] / 255 - ref).max() <= 0.5 / 255 + 1e-6


def test_a_subset_of_output_channels(tmp_path):
    """channels= keeps only the classes asked for, in the lazy result and in the store;
    anything else is refused naming the model's channel count."""
    from volarray.models import MultiScaleNet
    model = seeded(MultiScaleNet)
    vol = random_volume((16, 16, 16), seed=6)
    ref = whole_volume(model, vol)
    n = ref.shape[0]
    one = volarray.predict(model, vol, chunks=8, channels=1)
    assert one.shape == (1,) + vol.shape
    np.testing.assert_allclose(one.compute(), ref[1:2], atol=1e-5)
    two = volarray.predict(model, vol, channels=[n - 1, 0], output_dtype="float16").compute()
    np.testing.assert_allclose(two, ref[[n - 1, 0]], atol=2e-3)
    stored = volarray.predict_to_zarr(model, vol, tmp_path / "c.zarr", channels=[0])
    assert stored.shape == (1,) + vol.shape
    np.testing.assert_allclose(stored[...], ref[:1], atol=1e-5)
    for bad in (n, -1, [0, 0], [], True, "1"):
        with pytest.raises(volarray.InputError, match="channels="):
            volarray.predict(model, vol, channels=bad)
    with pytest.raises(volarray.InputError, match="labels"):
        volarray.predict(model, vol, channels=[0], output="argmax")
