"""``chunks=`` / ``--chunks`` are the output's chunks, also for a model whose output is
not the input's size (a stride-2 head, an upsampling head): the plan says them and the
stored zarr has them."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import volarray

from conftest import random_volume, whole_volume

MODEL_FILE = """
import torch

class Half(torch.nn.Module):
    '''A stride-2 head: the output is half the input's size.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)

class Double(torch.nn.Module):
    '''An upsampling head: the output is twice the input's size.'''
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), scale_factor=2)

def half():
    torch.manual_seed(0)
    return Half().eval()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("outchunks")
    (d / "scaled.py").write_text(MODEL_FILE)
    sys.path.insert(0, str(d))
    try:
        import scaled
    finally:
        sys.path.remove(str(d))
    vol = random_volume((32, 32, 24), seed=2)
    np.save(d / "vol.npy", vol)
    return d, scaled, vol


def test_predict_to_zarr_stores_the_chunks_asked_for(work):
    d, scaled, vol = work
    model = scaled.half()
    plan = volarray.plan(model, vol, chunks=4)
    assert plan.output_chunks == (4, 4, 4) and "chunks (4, 4, 4)" in str(plan)
    volarray.predict_to_zarr(model, vol, str(d / "half.zarr"), chunks=4)
    out = zarr.open_group(str(d / "half.zarr"), mode="r")["prediction"]
    assert out.shape == (2, 16, 16, 12) and out.chunks == (2, 4, 4, 4)
    assert np.abs(out[...] - whole_volume(model, vol)).max() <= 1e-5
    # an axis left to the planner, a whole axis (-1) and one larger than the output
    y = volarray.predict(model, vol, chunks=(6, -1, 100))
    assert y.chunksize == (2, 6, 16, 12)
    assert np.abs(y.compute() - whole_volume(model, vol)).max() <= 1e-5
    odd = random_volume((33, 20, 27), seed=3)  # halved to (17, 10, 14): whole axes, one chunk
    y = volarray.predict(model, odd, chunks=-1)
    assert y.numblocks == (1, 1, 1, 1)
    assert np.abs(y.compute() - whole_volume(model, odd)).max() <= 1e-5


def test_upsampling_head_whole_axis_and_an_odd_side(work):
    _, scaled, vol = work
    torch.manual_seed(1)
    model = scaled.Double().eval()
    y = volarray.predict(model, vol, chunks=(8, -1, 100))
    assert y.chunksize == (2, 8, 64, 48)
    assert np.abs(y.compute() - whole_volume(model, vol)).max() <= 1e-5
    plan = volarray.plan(model, vol, chunks=5)  # no input side gives 5: the plan says so
    assert plan.output_chunks == (4, 4, 4) and "chunks there are 4, the nearest side to " \
        "the 5 asked for" in str(plan)
    assert volarray.predict(model, vol, chunks=5).chunksize == (2, 4, 4, 4)


@pytest.mark.slow  # a CLI subprocess (10 s); the default run stays under 15 minutes
def test_cli_chunks_of_a_half_size_output(work):
    d, scaled, vol = work
    r = subprocess.run([sys.executable, "-m", "volarray.cli", "plan", "vol.npy", "--model",
                        "scaled:half", "--chunks", "4"], cwd=d, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "chunks (4, 4, 4) (input chunks (8, 8, 8))" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "volarray.cli", "predict", "vol.npy", "cli.zarr",
                        "--model", "scaled:half", "--chunks", "4", "--quiet"], cwd=d,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = zarr.open_group(str(d / "cli.zarr"), mode="r")["prediction"]
    assert out.chunks == (2, 4, 4, 4)
    assert np.abs(out[...] - whole_volume(scaled.half(), vol)).max() <= 1e-5
