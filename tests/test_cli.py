"""The command line, through a subprocess, on real zarr stores; bad input gives one
clear line on stderr, a non-zero exit, no traceback, and no output left behind."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import volarray

from volarray.models import FaultSeg3D, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

MODEL_FILE = """
from volarray.models import FaultSeg3D

def small():
    return FaultSeg3D(width=4)

def broken():
    raise RuntimeError("no GPU here")

not_a_model = lambda: 42

def mc_dropout():  # the callable chose its modes: only the dropout samples
    import torch
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Dropout3d(0.3), torch.nn.Conv3d(4, 1, 1))
    m.eval()[2].train()
    return m

def stray_batch_norm():  # eval() then a BatchNorm left in training mode by mistake
    import torch
    m = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4))
    m.eval()[1].train()
    return m
"""


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "mymodels.py").write_text(MODEL_FILE)
    torch.manual_seed(0)
    model = seeded(FaultSeg3D, width=4)
    torch.save(model.state_dict(), d / "w.pt")
    vol = random_volume((16, 24, 32), seed=3)
    g = zarr.open_group(str(d / "survey.zarr"), mode="w")
    g.create_array("amplitude", data=vol, chunks=(8, 8, 8))
    np.save(d / "vol.npy", vol)
    return d, model, vol


def test_predict_group_with_weights_and_preview(work):
    d, model, vol = work
    r = run("predict", "survey.zarr", "out.zarr", "--model", "mymodels:small", "--weights",
            "w.pt", "--var", "amplitude", "--chunks", "8", "--preview", "p.png", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "computing" not in r.stderr  # a log: no progress bar
    assert "wrote out.zarr/prediction" in r.stdout
    out = zarr.open_group(str(d / "out.zarr"), mode="r")["prediction"]
    assert_volume_close(out[...], whole_volume(model, vol))
    png = (d / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_callables_own_modes_are_kept(work):
    """A model as built (every module in training mode, torch's default) is put in
    eval(); one whose callable set its modes keeps them: Monte Carlo dropout samples
    through --ensemble as through Python, and a stray training-mode norm is refused."""
    d, _, vol = work
    r = run("predict", "vol.npy", "mc.zarr", "--model", "mymodels:mc_dropout", "--ensemble",
            "3", "--seed", "5", "--chunks", "8", cwd=d)
    assert r.returncode == 0, r.stderr
    out = zarr.open_group(str(d / "mc.zarr"), mode="r")
    sys.path.insert(0, str(d))
    try:
        import mymodels
        mean, std = volarray.predict(mymodels.mc_dropout(), vol, ensemble=3, seed=5, chunks=8)
    finally:
        sys.path.remove(str(d))
    assert float(out["prediction_std"][...].max()) > 0.01
    np.testing.assert_array_equal(out["prediction_mean"][...], mean.compute())
    np.testing.assert_array_equal(out["prediction_std"][...], std.compute())
    r = run("predict", "vol.npy", "bn.zarr", "--model", "mymodels:stray_batch_norm", cwd=d)
    assert r.returncode == 2 and "training mode" in r.stderr, r.stderr
    assert not (d / "bn.zarr").exists()


def test_plan_and_resume_and_overwrite(work):
    d, model, vol = work
    r = run("plan", "vol.npy", "--model", "mymodels:small", "--chunks", "8", cwd=d)
    assert r.returncode == 0 and "volarray plan" in r.stdout and "stage" in r.stdout
    assert run("predict", "vol.npy", "o2.zarr", "--model", "mymodels:small", "--weights", "w.pt",
               "--quiet", cwd=d).returncode == 0
    r = run("predict", "vol.npy", "o2.zarr", "--model", "mymodels:small", "--weights", "w.pt",
            cwd=d)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run("predict", "vol.npy", "o2.zarr", "--model", "mymodels:small", "--weights", "w.pt",
            "--resume", cwd=d)
    assert r.returncode == 0, r.stderr
    r = run("predict", "vol.npy", "o2.zarr", "--model", "mymodels:small", "--overwrite",
            "--quiet", cwd=d)
    assert r.returncode == 0, r.stderr


def test_demo_small(work):
    d, _, _ = work
    r = run("demo", "--size", "32", "--scheduler", "sync", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "exact" in r.stdout and "max |volarray - torch|" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["nothere.zarr", "o.zarr", "--model", "mymodels:small"], "does not exist"),
    (["vol.npy", "o.zarr", "--model", "nomodule:x"], "cannot import 'nomodule'"),
    (["vol.npy", "o.zarr", "--model", "mymodels:missing"], "no callable 'missing'"),
    (["vol.npy", "o.zarr", "--model", "mymodels:broken"], "no GPU here"),
    (["vol.npy", "o.zarr", "--model", "mymodels:not_a_model"], "not a torch.nn.Module"),
    (["vol.npy", "o.zarr", "--model", "FaultSeg3D"], "MODULE:CALLABLE"),
    (["vol.npy", "o.zarr", "--model", "mymodels:small", "--weights", "nope.pt"], "does not exist"),
    (["vol.npy", "o.zarr", "--model", "mymodels:small", "--weights", "bad.pt"], "safely"),
    (["vol.npy", "o.zarr", "--model", "volarray.models:FaultSeg3D", "--weights", "w.pt"],
     "does not fit"),
    (["flat.npy", "o.zarr", "--model", "mymodels:small"], "(Z, Y, X)"),
    (["nan.npy", "o.zarr", "--model", "mymodels:small"], "NaN"),
    (["survey.zarr", "o.zarr", "--model", "mymodels:small", "--var", "nope"], "--var"),
    (["vol.npy", "notes.txt", "--model", "mymodels:small"],  # each flag once, as a flag
     "neither replaces it with --overwrite nor resumes into it with --resume:"),
])
def test_bad_input(work, args, needle):
    d, _, vol = work
    (d / "bad.pt").write_bytes(b"not a pickle at all")
    np.save(d / "flat.npy", vol[0])
    bad = vol.copy()
    bad[5, 6, 7] = np.nan
    np.save(d / "nan.npy", bad)
    (d / "notes.txt").write_text("the user's own")
    r = run("predict", *args, cwd=d)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    screen = [line.split("\r")[-1].strip() for line in r.stderr.splitlines()]  # as a terminal
    assert len([line for line in screen if line]) <= 2, r.stderr
    assert not (d / "o.zarr").exists() and (d / "notes.txt").read_text() == "the user's own"
