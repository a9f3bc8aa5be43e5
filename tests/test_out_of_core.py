"""predict_to_zarr overlaps reading, compute and writing: the input's digests are tasks
of the run's own graph (no pass over the input before it), recorded before any
completion mark, and tasks read their input outside the device slot."""
import contextlib
import threading

import dask
import numpy as np
import pytest
import zarr

import volarray
import volarray.store
from volarray import devices, runners
from volarray.digest import input_hashes
from volarray.io import as_dask_volume, open_volume
from volarray.models import FaultSeg3D, seeded
from volarray.readers import CheckedReader

from conftest import random_volume

CHUNKS = (8, 16, 16)  # the input's zarr chunks: 4 x 2 x 2 = 16 of them


@pytest.fixture(scope="module")
def model():
    return seeded(FaultSeg3D, width=4)


@pytest.fixture()
def survey(tmp_path):
    vol = random_volume((32, 32, 32), seed=11)
    path = tmp_path / "in.zarr"
    zarr.create_array(str(path), data=vol, chunks=CHUNKS)
    return path, vol


class Reads:
    """Counts the reads of the input's zarr array, apart: before the run's graph
    starts (``before``), and while a task holds a device slot (``in_slot``)."""

    def __init__(self, monkeypatch):
        self.before, self.during, self.in_slot = 0, 0, 0
        self.running, self.held = False, threading.local()
        read = CheckedReader.__getitem__

        def counted(reader, index):
            if getattr(self.held, "slot", False):
                self.in_slot += 1
            if self.running:
                self.during += 1
            else:
                self.before += 1
            return read(reader, index)
        monkeypatch.setattr(CheckedReader, "__getitem__", counted)
        compute = volarray.store.compute_stoppable

        def run(collection, scheduler):
            self.running = True
            try:
                return compute(collection, scheduler)
            finally:
                self.running = False
        monkeypatch.setattr(volarray.store, "compute_stoppable", run)


def test_input_hashed_in_the_run_not_in_a_pass_before_it(model, survey, tmp_path,
                                                         monkeypatch):
    path, vol = survey
    reads = Reads(monkeypatch)
    out = tmp_path / "out.zarr"
    arr = volarray.predict_to_zarr(model, str(path), str(out), chunks=16,
                                   scheduler="threads")
    # before the graph runs, only the chunks under the three small boxes of the run's
    # identity (`store.input_sample`, 10 reads here); a digest pass would add all 16
    assert reads.before < 16 and reads.during >= 16
    group = zarr.open_group(str(out), mode="r")
    want = input_hashes(as_dask_volume(open_volume(str(path))))
    np.testing.assert_array_equal(group["volarray_input_hashes"][...], want)
    same = volarray.predict(model, vol, chunks=16).compute(scheduler="threads")
    np.testing.assert_array_equal(arr[...], same)  # bitwise the in-memory result


def test_no_mark_before_the_digests_are_recorded(model, survey, tmp_path, monkeypatch):
    path, _ = survey
    seen = []
    write = volarray.store.write_block

    def checked(out, names, index, *blocks):
        hashes = out.where.open_group("r")["volarray_input_hashes"][...]
        seen.append(bool(hashes.any(axis=-1).all()))
        return write(out, names, index, *blocks)
    monkeypatch.setattr(volarray.store, "write_block", checked)
    volarray.predict_to_zarr(model, str(path), str(tmp_path / "out.zarr"), chunks=16,
                             scheduler="threads")
    assert len(seen) == 8 and all(seen)


def test_a_changed_input_is_still_refused_on_resume(model, survey, tmp_path, monkeypatch):
    path, _ = survey
    out = tmp_path / "out.zarr"
    volarray.predict_to_zarr(model, str(path), str(out), chunks=16, scheduler="sync")
    marks = zarr.open_group(str(out), mode="r+")["volarray_done"]
    marks[0, 0, 0] = 0  # as if stopped before this chunk
    data = zarr.open_array(str(path), mode="r+")
    data[2, 28, 2] = data[2, 28, 2] + 1.0  # in none of the three sampled boxes
    with pytest.raises(volarray.VolarrayError, match="the input changed"):
        volarray.predict_to_zarr(model, str(path), str(out), chunks=16, resume=True,
                                 scheduler="sync")


class FlaggedSlots(devices.DeviceSlots):
    """Device slots that flag the thread holding one."""

    def __init__(self, held):
        super().__init__()
        self.held, self.uses = held, 0

    @contextlib.contextmanager
    def use(self, names):
        with super().use(names) as d:
            self.held.slot, self.uses = True, self.uses + 1
            try:
                yield d
            finally:
                self.held.slot = False


def test_input_read_and_output_written_outside_the_device_slot(model, survey, tmp_path,
                                                               monkeypatch):
    path, _ = survey
    reads = Reads(monkeypatch)
    slots = FlaggedSlots(reads.held)
    monkeypatch.setattr(runners, "SLOTS", slots)
    writes_in_slot = []
    write = volarray.store.write_block

    def checked(*a):
        writes_in_slot.append(getattr(reads.held, "slot", False))
        return write(*a)
    monkeypatch.setattr(volarray.store, "write_block", checked)
    with dask.config.set(num_workers=4):
        volarray.predict_to_zarr(model, str(path), str(tmp_path / "out.zarr"), chunks=16,
                                 scheduler="threads", keep=0)
    assert slots.uses >= 8 and reads.during >= 16
    assert reads.in_slot == 0 and writes_in_slot == [False] * 8
