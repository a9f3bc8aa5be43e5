"""zarr in and out, resume after a killed run, scratch stores, and bad input that
leaves nothing half-written."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import volarray
import volarray.store
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, slow_writes, whole_volume


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=8)


@pytest.fixture(scope="module")
def volume():
    return random_volume((32, 48, 40), seed=7)


@pytest.fixture(scope="module")
def reference(model, volume):
    return whole_volume(model, volume)


def _zarr_input(tmp_path, volume, fmt=3):
    path = tmp_path / f"in-v{fmt}.zarr"
    zarr.create_array(str(path), shape=volume.shape, chunks=(16, 16, 16), dtype="f4",
                      zarr_format=fmt)[:] = volume
    return path


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("scratch", [False, True])
def test_zarr_to_zarr_exact(tmp_path, model, volume, reference, fmt, scratch):
    out = volarray.predict_to_zarr(model, _zarr_input(tmp_path, volume, fmt),
                                   tmp_path / "out.zarr", chunks=(16, 24, 20), scratch=scratch)
    assert out.chunks == (1, 16, 24, 20)  # output chunks are the plan's
    assert_volume_close(out[...], reference)
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert group[volarray.store.DONE][...].all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-v%d.zarr" % fmt, "out.zarr"]


def test_chunk_writes_share_the_opened_output(tmp_path, model, volume, reference, monkeypatch):
    """A run opens its output group a few times, not once per chunk (that was 2 ms of a
    4 ms task at 8^3 chunks); still exact, every chunk marked."""
    from volarray.location import Location
    opened = []
    open_group = Location.open_group

    def counting(self, mode):
        opened.append(mode)
        return open_group(self, mode)
    monkeypatch.setattr(Location, "open_group", counting)
    out = volarray.predict_to_zarr(model, volume, tmp_path / "out.zarr", chunks=8)
    n_chunks = int(np.prod(out.cdata_shape[-3:]))
    assert n_chunks == 4 * 6 * 5 and len(opened) <= 8, (len(opened), n_chunks)
    assert_volume_close(out[...], reference)
    assert zarr.open_group(str(tmp_path / "out.zarr"), mode="r")[volarray.store.DONE][...].all()


def test_npy_group_and_threads_inputs(tmp_path, model, volume, reference):
    np.save(tmp_path / "v.npy", volume)
    out = volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "a.zarr", chunks=16,
                                   scheduler="threads")
    assert_volume_close(out[...], reference)
    g = zarr.open_group(str(tmp_path / "survey.zarr"), mode="w")
    g.create_array("amplitude", data=volume, chunks=(8, 8, 8))
    g.create_array("mask", data=np.zeros(3, "u1"))
    with pytest.raises(volarray.InputError, match=r"\['amplitude', 'mask'\]; pass var="):
        volarray.predict_to_zarr(model, tmp_path / "survey.zarr", tmp_path / "b.zarr")
    out = volarray.predict_to_zarr(model, tmp_path / "survey.zarr", tmp_path / "b.zarr",
                                   var="amplitude", name="fault")
    assert_volume_close(out[...], reference)
    assert not (tmp_path / "c.zarr").exists()


def test_scratch_removed_when_the_run_fails(tmp_path, model, volume, monkeypatch):
    def boom(*a):
        raise RuntimeError("disk full")
    monkeypatch.setattr(volarray.store, "write_block", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        volarray.predict_to_zarr(model, volume, tmp_path / "out.zarr", chunks=16, scratch=True,
                                 scheduler="sync")
    # no scratch left behind; no chunk was finished, so the fresh output held nothing
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_scratch_writes_behind_compute(tmp_path, model, volume, reference, monkeypatch,
                                       scheduler):
    """Kept tensors are written to scratch by a background thread while the worker goes
    on; a reader waits for the write it needs, so slow writes change nothing but time."""
    import threading
    import volarray.worker as ex
    writers, original = [], ex._write_region

    def slow(where, region, y):
        time.sleep(0.05)
        writers.append(threading.current_thread().name)
        original(where, region, y)
    monkeypatch.setattr(ex, "_write_region", slow)
    out = volarray.predict_to_zarr(model, volume, tmp_path / "out.zarr", chunks=16,
                                   scratch=True, scheduler=scheduler, keep="64x")
    assert_volume_close(out[...], reference)
    assert writers and all(w.startswith("volarray-scratch-writer") for w in writers)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]  # scratch removed


def test_a_pending_write_leaves_the_process_only_written():
    """Pickled (a distributed transfer), a write token waits for its write."""
    import pickle
    import threading
    from concurrent.futures import Future
    from volarray.worker import PendingWrite
    future, done = Future(), []

    def finish():
        time.sleep(0.2)
        done.append(True)
        future.set_result(None)
    threading.Thread(target=finish).start()
    assert pickle.loads(pickle.dumps(PendingWrite(future))) is True
    assert done == [True]
    failed = Future()
    failed.set_exception(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        PendingWrite(failed).wait()


def test_existing_output_is_never_overwritten_unless_asked(tmp_path, model, volume, reference):
    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    # one answer whatever the flags: no flag is suggested that would then be refused
    for flags in ({}, {"resume": True}, {"overwrite": True, "chunks": 16}):
        with pytest.raises(volarray.InputError, match="is a folder that volarray did not "
                                                      "write; volarray neither replaces"):
            volarray.predict_to_zarr(model, volume, target, **flags)
        assert (target / "precious.txt").read_text() == "keep me"
    out = volarray.predict_to_zarr(model, volume, tmp_path / "new.zarr", chunks=16)
    with pytest.raises(volarray.InputError, match=r"a run with other settings \(its arrays and chunks differ\); the first run wrote chunks of \(16, 16, 16\)"):
        volarray.predict_to_zarr(model, volume, tmp_path / "new.zarr", chunks=8, resume=True)
    out = volarray.predict_to_zarr(model, volume, tmp_path / "new.zarr", chunks=8,
                                   overwrite=True)
    assert_volume_close(out[...], reference)


@pytest.mark.parametrize("bad,needle", [
    ("missing.zarr", "does not exist"),
    (np.zeros((8, 8), np.float32), r"needs \(Z, Y, X\)"),
    (np.zeros((8, 8, 8), bool), "dtype bool"),
])
def test_bad_input_writes_nothing(tmp_path, model, bad, needle):
    if isinstance(bad, str):
        bad = tmp_path / bad
    with pytest.raises(volarray.InputError, match=needle):
        volarray.predict_to_zarr(model, bad, tmp_path / "out.zarr")
    assert list(tmp_path.iterdir()) == []


KILLED_RUN = slow_writes(0.15) + """
import sys
import volarray
from volarray.models import FaultSeg3D, seeded
volarray.predict_to_zarr(seeded(FaultSeg3D, width=8), sys.argv[1], sys.argv[2], chunks=8,
                         scheduler="sync", scratch=True)
"""


def test_resume_after_kill_is_bitwise_equal(tmp_path, model, volume, monkeypatch):
    np.save(tmp_path / "v.npy", volume)
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "v.npy"),
                             str(killed)], cwd=Path(__file__).parent)
    done = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            done = zarr.open_group(str(killed), mode="r")[volarray.store.DONE][...]
            if done.sum() >= 6:
                break
        except Exception:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marks = zarr.open_group(str(killed), mode="r")[volarray.store.DONE][...]
    missing = int((marks == 0).sum())
    assert 0 < missing < marks.size
    # a chunk half-written when the process died: garbage without a mark
    out = zarr.open_group(str(killed), mode="r+")["prediction"]
    i, j, k = (int(x) for x in np.argwhere(marks == 0)[0])
    out[:, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8, k * 8:(k + 1) * 8] = 123.0

    writes = []
    orig = volarray.store.write_block
    monkeypatch.setattr(volarray.store, "write_block", lambda *a: writes.append(a[2]) or orig(*a))
    resumed = volarray.predict_to_zarr(model, tmp_path / "v.npy", killed, chunks=8,
                                       resume=True, scheduler="sync")
    assert len(writes) == missing  # only the unmarked chunks ran
    monkeypatch.setattr(volarray.store, "write_block", orig)
    fresh = volarray.predict_to_zarr(model, tmp_path / "v.npy", tmp_path / "fresh.zarr",
                                     chunks=8, scheduler="sync")
    np.testing.assert_array_equal(resumed[...], fresh[...])  # bitwise


def test_predict_to_zarr_with_norm_model(tmp_path):
    model = seeded(MultiScaleNet)
    vol = random_volume((19, 26, 23))
    out = volarray.predict_to_zarr(model, vol, tmp_path / "o.zarr", chunks=(8, 10, 12),
                                   scratch=True)
    assert_volume_close(out[...], whole_volume(model, vol))
