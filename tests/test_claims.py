"""One run per output: concurrent runs on the same output, stale claims, a resume that
cannot mix an old and a changed input, and messages that say what is so."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import volarray
from volarray.claim import claim_of
from volarray.location import Location
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.outputs import DONE
from volarray.testing import assert_volume_close

from conftest import random_volume, slow_writes, whole_volume

MODEL = "volarray.models:FaultSeg3D"
HERE = Path(__file__).parent

# a process that runs predict_to_zarr once per line it reads ("create PATH" or
# "overwrite PATH"), answering one JSON line: volarray is imported once, so that two of
# them start a run within milliseconds of being told to
WORKER = slow_writes(0.02) + """
import json, sys
import torch
import volarray
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).eval()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    kind, path = line.split()
    try:
        volarray.predict_to_zarr(model, sys.argv[1], path, chunks=4, scheduler="sync",
                                 overwrite=kind == "overwrite")
        print(json.dumps({"ok": True}), flush=True)
    except volarray.VolarrayError as e:
        print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e)}), flush=True)
"""


def _worker(input_path):
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(input_path)], cwd=HERE,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"ready": True}
    return proc


def _race(workers, kind, path):
    """Tell both workers to run on ``path``, the second 0.1 s after the first."""
    for i, w in enumerate(workers):
        if i:
            time.sleep(0.1)
        w.stdin.write(f"{kind} {path}\n")
        w.stdin.flush()
    return [json.loads(w.stdout.readline()) for w in workers]


@pytest.mark.slow  # 20 races take 14 s, starting the two processes as long again
def test_concurrent_runs_on_one_output_one_wins_each_time(tmp_path):
    vol = random_volume((8, 8, 8), seed=3)
    zarr.create_array(str(tmp_path / "in.zarr"), data=vol, chunks=(4, 4, 4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).eval()
    expected = whole_volume(model, vol)
    workers = [_worker(tmp_path / "in.zarr") for _ in range(2)]
    pids = [w.pid for w in workers]
    try:
        for i, w in enumerate(workers):  # a first run in each process traces the model
            w.stdin.write(f"create {tmp_path / f'warm{i}.zarr'}\n")
            w.stdin.flush()
        assert [json.loads(w.stdout.readline())["ok"] for w in workers] == [True, True]
        t0 = time.perf_counter()
        for rep in range(20):
            order = workers if rep % 2 == 0 else workers[::-1]
            out = tmp_path / f"out{rep}.zarr"
            for kind in ("create", "overwrite") if rep < 3 else ("create",):
                answers = _race(order, kind, out)
                assert sorted(a["ok"] for a in answers) == [False, True], answers
                lost = next(a for a in answers if not a["ok"])
                winner = pids[0] if order[answers.index(lost)] is workers[1] else pids[1]
                assert lost["type"] == "OutputBusyError", lost
                assert f"process {winner} on host" in lost["msg"], lost
                group = zarr.open_group(str(out), mode="r")
                assert group[DONE][...].all()
                assert_volume_close(group["prediction"][...], expected)
            assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        print(f"23 races in {time.perf_counter() - t0:.1f} s")
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=60)
            w.stdout.close()


SLOW_CLI = slow_writes(0.3) + """
import sys
import volarray.cli
sys.exit(volarray.cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flag", [[], pytest.param(["--overwrite"], marks=pytest.mark.slow)])
def test_cli_second_run_is_refused_in_one_line(tmp_path, flag):
    vol = random_volume((16, 16, 16), seed=4)
    np.save(tmp_path / "v.npy", vol)
    torch.save(seeded(FaultSeg3D).state_dict(), tmp_path / "w.pt")
    args = ["predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "w.pt", "--chunks",
            "8", "--quiet", "--scheduler", "sync"]
    if flag:  # replacing an output that exists
        volarray.predict_to_zarr(seeded(FaultSeg3D), vol * 0, tmp_path / "o.zarr", chunks=8)
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args, *flag],
                                      cwd=tmp_path, stderr=subprocess.PIPE, text=True))
        time.sleep(0.1)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errs
    loser = codes.index(1)
    lines = [line for line in errs[loser].splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in errs[loser], errs[loser]
    assert "is being written by another run (process " \
           f"{procs[1 - loser].pid} on host {socket.gethostname()!r}" in lines[0], lines[0]
    assert "run again with --resume, which keeps its finished chunks" in lines[0]
    out = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")["prediction"][...]
    assert_volume_close(out, whole_volume(seeded(FaultSeg3D), vol))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr", "v.npy", "w.pt"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_claim(out: Path, **info) -> Path:
    claim = Path(claim_of(Location.of(str(out))).path)
    claim.write_text(json.dumps({"since": time.time(), "token": "x", **info}))
    return claim


def test_stale_claims_are_taken_over_and_live_ones_respected(tmp_path):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((8, 8, 8))
    host = socket.gethostname()
    # a run killed with SIGKILL on this host: its process is gone
    claim = _write_claim(tmp_path / "a.zarr", pid=_dead_pid(), host=host)
    volarray.predict_to_zarr(model, vol, tmp_path / "a.zarr")
    assert not claim.exists()
    # a live run on this host (the pytest process's parent stands in for it)
    claim = _write_claim(tmp_path / "b.zarr", pid=os.getppid(), host=host, start=None)
    with pytest.raises(volarray.OutputBusyError, match=f"process {os.getppid()} on host"):
        volarray.predict_to_zarr(model, vol, tmp_path / "b.zarr")
    assert claim.exists() and not (tmp_path / "b.zarr").exists()
    claim.unlink()
    # another host's run: respected while it refreshes its claim, taken over after
    claim = _write_claim(tmp_path / "c.zarr", pid=1, host="node-17")
    with pytest.raises(volarray.OutputBusyError, match="'node-17'"):
        volarray.predict_to_zarr(model, vol, tmp_path / "c.zarr")
    old = time.time() - 3600
    os.utime(claim, (old, old))
    volarray.predict_to_zarr(model, vol, tmp_path / "c.zarr")
    assert not claim.exists()


def test_claim_released_on_errors_and_in_memory_stores(tmp_path):
    model, vol = seeded(FaultSeg3D, width=4), random_volume((8, 8, 8))
    with pytest.raises(volarray.InputError, match="threshold=0.5"):  # refused under the claim
        volarray.predict_to_zarr(model, vol, tmp_path / "o.zarr", output="argmax")
    assert list(tmp_path.iterdir()) == []
    import fsspec
    fs = fsspec.filesystem("memory")
    url = "memory://claims/o.zarr"
    fs.pipe_file("/claims/.o.zarr.volarray-claim", json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "since": time.time()}).encode())
    with pytest.raises(volarray.OutputBusyError, match="claims/o.zarr' is being written"):
        volarray.predict_to_zarr(model, vol, url)
    fs.rm_file("/claims/.o.zarr.volarray-claim")
    volarray.predict_to_zarr(model, vol, url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/claims", detail=False)) == ["o.zarr"]


# -- resume checks every input chunk ----------------------------------------------------

def _stopped_run(tmp_path, model, vol):
    """A run of ``vol`` (a zarr input in chunks of 8) stopped with some chunks unmarked,
    one of them half-written."""
    zarr.create_array(str(tmp_path / "in.zarr"), data=vol, chunks=(8, 8, 8))
    volarray.predict_to_zarr(model, tmp_path / "in.zarr", tmp_path / "o.zarr", chunks=8)
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r+")
    group[DONE][0, 0, 4:] = 0
    group["prediction"][:, :8, :8, 32:] = 123.0


def test_resume_refuses_an_input_changed_in_place_far_from_the_sample_boxes(tmp_path):
    model = seeded(FaultSeg3D)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    vol = random_volume((16, 16, 80), seed=6)
    _stopped_run(tmp_path, model, vol)
    # x = 20 is outside the three sample boxes (x 0-16, 32-48, 64-80)
    zarr.open_array(str(tmp_path / "in.zarr"), mode="r+")[9, 3, 20] += 1.0
    with pytest.raises(volarray.InputError, match=r"the input changed since output .* box "
                                                  r"\[0:1, 8:16, 0:8, 16:24\].*--overwrite"):
        volarray.predict_to_zarr(model, tmp_path / "in.zarr", tmp_path / "o.zarr", chunks=8,
                                 resume=True)
    r = subprocess.run([sys.executable, "-m", "volarray.cli", "predict", "in.zarr", "o.zarr",
                        "--model", MODEL, "--weights", "w.pt", "--chunks", "8", "--resume"],
                       cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "[0:1, 8:16, 0:8, 16:24]" in r.stderr and "--overwrite" in r.stderr
    out = volarray.predict_to_zarr(model, tmp_path / "in.zarr", tmp_path / "o.zarr",
                                   chunks=8, overwrite=True)
    changed = zarr.open_array(str(tmp_path / "in.zarr"))[...]
    assert_volume_close(out[...], whole_volume(model, changed))


def test_resume_of_an_unchanged_input_is_bitwise(tmp_path):
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((16, 16, 80), seed=6)
    _stopped_run(tmp_path, model, vol)
    resumed = volarray.predict_to_zarr(model, tmp_path / "in.zarr", tmp_path / "o.zarr",
                                       chunks=8, resume=True)
    fresh = volarray.predict_to_zarr(model, tmp_path / "in.zarr", tmp_path / "f.zarr",
                                     chunks=8)
    np.testing.assert_array_equal(resumed[...], fresh[...])


# -- messages that say what is so -------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "volarray.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_resume_with_another_model_names_what_differs(tmp_path):
    vol = random_volume((16, 16, 16))
    volarray.predict_to_zarr(seeded(FaultSeg3D), vol, tmp_path / "o.zarr", chunks=8)
    with pytest.raises(volarray.InputError) as e:
        volarray.predict_to_zarr(seeded(MultiScaleNet), vol, tmp_path / "o.zarr", chunks=8,
                                 resume=True)
    assert "model weights" in str(e.value) and "has shape (1, 16, 16, 16)" in str(e.value)
    assert "pass chunks" not in str(e.value)


@pytest.mark.slow  # a CLI subprocess (10 s); the default run stays under 15 minutes
def test_cli_resume_of_a_finished_output_says_so(tmp_path):
    np.save(tmp_path / "v.npy", random_volume((16, 16, 16)))
    torch.save(seeded(FaultSeg3D).state_dict(), tmp_path / "w.pt")
    args = ("predict", "v.npy", "o.zarr", "--model", MODEL, "--weights", "w.pt", "--chunks", "8")
    assert _cli(*args, "--quiet", cwd=tmp_path).returncode == 0
    r = _cli(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "o.zarr/prediction (1, 16, 16, 16) was already complete: nothing was computed" \
        in r.stdout and "wrote" not in r.stdout


@pytest.mark.slow  # a CLI subprocess (10 s); the default run stays under 15 minutes
def test_cli_output_that_is_a_file_gets_one_message(tmp_path):
    np.save(tmp_path / "v.npy", random_volume((8, 8, 8)))
    (tmp_path / "o.zarr").write_text("mine")
    lines = set()
    for flag in ([], ["--overwrite"], ["--resume"]):
        r = _cli("predict", "v.npy", "o.zarr", "--model", MODEL, *flag, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines.add(r.stderr.strip())
    assert len(lines) == 1, lines
    line = lines.pop()
    assert "is a file that volarray did not write" in line and "another path" in line
    assert (tmp_path / "o.zarr").read_text() == "mine"
