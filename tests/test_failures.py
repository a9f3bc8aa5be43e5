"""Failures a user meets mid-run, as they meet them: a full disk, a model that raises,
Ctrl-C twice or while starting, absurdly small chunks. Each ends in one line that says
what failed, what is kept and how to finish; the finished chunks resume bitwise."""
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
import zarr

import volarray
from volarray.cli_errors import in_flags
from volarray.cli_parser import option_names
from volarray.models import FaultSeg3D, seeded
from volarray.outputs import DONE

from conftest import random_volume, slow_writes

MODEL = "volarray.models:FaultSeg3D"

MODEL_FILE = """
import os, time
import torch
import torch.nn as nn

class Flaky(nn.Module):
    '''Raises on its 21st call when FLAKY is set, as a GPU error would partway through.'''
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("FLAKY") and self.calls > 20:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return torch.sigmoid(self.conv(x))

def flaky():
    torch.manual_seed(0)
    return Flaky().eval()

class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

def flat():
    return Flat().eval()

def small():
    from volarray.models import FaultSeg3D
    torch.manual_seed(0)
    return FaultSeg3D(width=4).eval()

def sleepy():
    open("loading", "w").close()
    time.sleep(120)
"""

# a disk that fills after three chunks: every later chunk write raises ENOSPC
FULL_DISK = """
import errno, itertools, sys, threading
import volarray.store
_write_block, _count, _lock = volarray.store.write_block, itertools.count(1), threading.Lock()
def full_disk(*a):
    with _lock:
        n = next(_count)
    if n > 3:
        raise OSError(errno.ENOSPC, "No space left on device", str(a[0].path))
    return _write_block(*a)
volarray.store.write_block = full_disk
import volarray.cli
sys.exit(volarray.cli.main(sys.argv[1:]))
"""


def cli(*args, cwd, script=None, env=None, timeout=300):
    head = ["-c", script] if script else ["-m", "volarray.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def screen(stderr: str) -> list[str]:
    """What a terminal shows: progress bars overwrite themselves with \\r."""
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    return [line for line in lines if line]


def one_line(stderr: str) -> str:
    lines = screen(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def popen(args, cwd, script=None):
    head = ["-c", script] if script else ["-m", "volarray.cli"]
    # a shell's background jobs ignore SIGINT, and children inherit that: restore it
    return subprocess.Popen([sys.executable, *head, *map(str, args)], cwd=cwd,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def marks(store: Path) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")[DONE][...]


@pytest.fixture
def work(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODEL_FILE)
    vol = random_volume((16, 16, 24), seed=5)
    np.save(tmp_path / "v.npy", vol)
    torch.save(seeded(FaultSeg3D).state_dict(), tmp_path / "w.pt")
    return tmp_path, vol


# -- a full disk, a model that raises: one line, chunks kept, --resume finishes --------------

def test_cli_disk_full_keeps_finished_chunks_and_resume_finishes_bitwise(work):
    d, vol = work
    args = ["predict", "v.npy", "o.zarr", "--model", "mymodels:small", "--chunks", "8",
            "--quiet"]
    r = cli(*args, cwd=d, script=FULL_DISK)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("volarray: error: the run failed: OSError: [Errno 28] No space "
                           "left on device"), line
    assert "chunks are finished and kept in 'o.zarr'" in line and "free disk space" in line
    assert "--resume" in line and "resume=" not in line and "--debug" in line
    assert "run again with the same arguments and --resume" in line  # its --chunks 8 too
    assert 3 <= marks(d / "o.zarr").sum() < marks(d / "o.zarr").size
    assert sorted(p.name for p in d.iterdir() if p.name != "__pycache__") == [
        "mymodels.py", "o.zarr", "v.npy", "w.pt"]  # no scratch left
    r = cli(*args, "--resume", cwd=d)  # space freed
    assert r.returncode == 0, r.stderr
    fresh = volarray.predict_to_zarr(load_models(d).small(), vol, d / "fresh.zarr", chunks=8)
    resumed = zarr.open_group(str(d / "o.zarr"), mode="r")["prediction"][...]
    np.testing.assert_array_equal(resumed, fresh[...])


def load_models(folder: Path):
    """The test's model file, imported here as the command line imports it."""
    sys.path.insert(0, str(folder))
    try:
        import mymodels
        return importlib.reload(mymodels)
    finally:
        sys.path.remove(str(folder))


def test_cli_model_raising_in_window_mode_keeps_chunks_and_resumes(work):
    d, vol = work
    args = ["predict", "v.npy", "o.zarr", "--model", "mymodels:flaky", "--method", "window",
            "--roi-size", "8", "--chunks", "8", "--scheduler", "sync", "--quiet"]
    env = dict(os.environ, FLAKY="1")
    r = cli(*args, cwd=d, env=env)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert "the run failed: RuntimeError: CUDA error: an illegal memory access" in line, line
    assert "mymodels.py:" in line and "in forward" in line  # the model's line at fault
    assert "chunks are finished and kept in 'o.zarr'" in line and "--resume" in line
    done = marks(d / "o.zarr")
    assert 0 < done.sum() < done.size
    r = cli(*args, "--resume", cwd=d)
    assert r.returncode == 0, r.stderr
    ref = volarray.predict(load_models(d).flaky(), vol, method="window", roi_size=8,
                           chunks=8).compute(scheduler="sync")
    np.testing.assert_array_equal(zarr.open_group(str(d / "o.zarr"))["prediction"][...], ref)


def test_cli_two_d_model_in_window_mode_is_one_line_naming_its_line(work):
    d, _ = work
    args = ["predict", "v.npy", "o.zarr", "--model", "mymodels:flat", "--method", "window",
            "--roi-size", "8"]
    r = cli(*args, cwd=d)
    line = one_line(r.stderr)
    assert r.returncode == 2 and line.startswith("volarray: error: --model: --method window "
                                                 "could not run Flat on a window of shape "
                                                 "(1, 1, 8, 8, 8) at "), line
    assert "mymodels.py:" in line and "conv2d" in line and "--roi-size" in line
    env = dict(os.environ, VOLARRAY_DEBUG="1")
    r = cli(*args, cwd=d, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "conv2d" in r.stderr
    assert not (d / "o.zarr").exists()


def test_debug_flag_raises_what_failed(work, monkeypatch, capsys):
    from volarray.cli import main
    d, _ = work
    monkeypatch.chdir(d)
    monkeypatch.syspath_prepend(str(d))
    args = ["predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "nope.pt"]
    assert main(args) == 2 and "--weights nope.pt" in capsys.readouterr().err
    for argv in (args + ["--debug"], ["--debug"] + args):  # after the command, or before
        with pytest.raises(volarray.InputError, match="weights='nope.pt' does not exist"):
            main(argv)
    monkeypatch.setenv("VOLARRAY_DEBUG", "0")
    assert main(args) == 2


def test_two_d_model_in_window_mode_api():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).eval()
    with pytest.raises(volarray.InputError, match=r"method='window' could not run Sequential "
                       r"on a window of shape \(1, 1, 8, 8, 8\).*conv2d.*3-D model") as e:
        volarray.predict(model, random_volume((16, 16, 16)), method="window", roi_size=8)
    assert e.value.parameter == "model"


def test_dataset_without_var_names_var_and_the_variables():
    ds = xr.Dataset({"amplitude": (("z", "y", "x"), random_volume((8, 8, 8))),
                     "inline": ("y", np.arange(8))})
    with pytest.raises(volarray.InputError, match=r"needs var=.*\['amplitude', 'inline'\].*"
                                                  r"var='amplitude'") as e:
        ds.volinfer.predict(seeded(FaultSeg3D, width=4))
    assert e.value.parameter == "var"


# -- Ctrl-C: twice exits at once, while starting is one line ---------------------------------

@pytest.mark.parametrize("tries", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_cli_second_ctrl_c_exits_at_once_with_130(work, tries):
    d, _ = work
    np.save(d / "v.npy", random_volume((24, 24, 32), seed=4))
    args = ["predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "w.pt", "--chunks", "8",
            "--quiet"]
    script = slow_writes(0.2) + """
import sys, volarray.cli
sys.argv[0] = "volarray"  # as the volarray script's process
sys.exit(volarray.cli.main(sys.argv[1:]))
"""
    for _ in range(tries):
        for p in d.glob("*o.zarr*"):  # the output, its scratch, its claim (a file)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        proc = popen(args, d, script)
        deadline, done = time.time() + 240, 0
        while time.time() < deadline and proc.poll() is None and done < 2:
            try:
                done = int(marks(d / "o.zarr").sum())
            except Exception:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "terminate called" not in err and "Traceback" not in err, err
        assert time.time() - t0 < 30
        # the line of the second Ctrl-C, or the first's if it was handled already
        assert "--resume" in screen(err)[-1] and "chunks" in screen(err)[-1], err
        assert marks(d / "o.zarr").sum() >= 2  # the finished chunks are kept


def test_cli_ctrl_c_while_starting_is_one_line(work):
    d, _ = work
    args = ["predict", "v.npy", "o.zarr", "--model", "mymodels:sleepy"]
    proc = popen(args, d)  # while torch loads
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.time() + 120
    while time.time() < deadline and proc.poll() is None and "torch" not in maps.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in one_line(err), err
    proc = popen(args, d)  # while the model loads
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (d / "loading").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert one_line(err) == "volarray: interrupted; nothing was written"
    assert not (d / "o.zarr").exists()


# -- absurdly small chunks warn before anything heavy runs ------------------------------------

def test_tiny_chunks_warn_before_planning(monkeypatch):
    import volarray.planner
    monkeypatch.setattr(volarray.planner, "choose_kept", lambda *a: pytest.fail("planned"))
    model, vol = seeded(FaultSeg3D, width=4), random_volume((64, 64, 64))
    with pytest.raises(volarray.TaskCountWarning, match=r"chunks=\(1, 1, 1\) split the volume "
                       r"\(64, 64, 64\) into 262,144 chunks.*pass chunks=8 or larger \(512 "
                       r"chunks\)"):
        volarray.plan(model, vol, chunks=1)
    with pytest.raises(volarray.TaskCountWarning, match="262,144 output chunks.*chunks=8"):
        volarray.predict(model, vol, method="window", roi_size=16, chunks=1)
    assert issubclass(volarray.TaskCountWarning, volarray.VolarrayWarning)


def test_cli_tiny_chunks_warn_in_one_line_and_ctrl_c_stops_planning(work):
    d, _ = work
    np.save(d / "big.npy", random_volume((64, 64, 64)))
    proc = popen(["plan", "big.npy", "--model", MODEL, "--chunks", "1"], d)
    first = proc.stderr.readline()
    assert first.startswith("volarray: warning: --chunks 1,1,1 split the volume (64, 64, 64) "
                            "into 262,144 chunks"), first
    assert "pass --chunks 8 or larger" in first and "chunks=" not in first
    proc.send_signal(signal.SIGINT)  # while it plans
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and one_line(err) == "volarray: interrupted; nothing was written"


# -- the command line names flags, not the API's parameters -----------------------------------

@pytest.mark.parametrize("message,expected", [
    ("weights='w.pt' does not exist", "--weights w.pt does not exist"),
    ("pass overwrite=True (--overwrite) to replace it or resume=True (--resume) to finish",
     "pass --overwrite to replace it or --resume to finish"),
    ("the first run wrote chunks of (8, 8, 8): pass chunks=(8, 8, 8) as it did",
     "the first run wrote chunks of (8, 8, 8): pass --chunks 8,8,8 as it did"),
    ("method='window' needs roi_size=, the model's patch size",
     "--method window needs --roi-size, the model's patch size"),
    ("above memory_limit=1.0 kB; so pass memory_limit >= 1.6 MB",
     "above --memory-limit 1.0 kB; so pass --memory-limit >= 1.6 MB"),
    ("pass var= one of them", "pass --var one of them"),
    ("scratch=True keeps them on disk; tile_step_size=0.5.",
     "--scratch disk keeps them on disk; --step 0.5."),
    ("pass select=None", "pass no --select"),
    ("pass folds=(0, 1) or some of them", "pass --folds 0 1 or some of them"),
    ("weights='my weights.pt' is empty", "--weights 'my weights.pt' is empty"),
    # not flags: left as they are
    ("save `torch.save(model.state_dict(), path)` with strict=False into store=",
     "save `torch.save(model.state_dict(), path)` with strict=False into store="),
    ("'/data/memory_limit/x.npy' holds NaN", "'/data/memory_limit/x.npy' holds NaN"),
])
def test_messages_name_flags(message, expected):
    assert in_flags(message, option_names()) == expected


def test_cli_weights_message_names_the_flag(work):
    d, _ = work
    r = cli("predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "nope.pt", cwd=d)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "--weights nope.pt does not exist" in line
    assert "weights=" not in line
