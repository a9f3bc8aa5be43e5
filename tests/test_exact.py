"""exact mode equals the whole-volume forward for every reference model, shape,
chunking and scheduler."""
import dask.array as da
import numpy as np
import pytest

import volarray
import volarray.worker
from volarray.models import FaultSeg3D, MultiScaleNet, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume

# (model factory, volume shape, chunkings). Chunks are uneven (they do not divide
# the shape) and some are smaller than the model's halo.
CASES = {
    "FaultSeg3D": (lambda: seeded(FaultSeg3D), (24, 40, 56), [(16, 24, 20), (7, 9, 11)]),
    "FaultSeg3D-2ch": (lambda: seeded(FaultSeg3D, in_channels=2, out_channels=2, width=8),
                       (2, 32, 24, 16), [(9, 13, 7)]),
    "MultiScaleNet": (lambda: seeded(MultiScaleNet), (19, 26, 23), [(8, 10, 12), (5, 7, 6)]),
    "MultiScaleNet-flat": (lambda: seeded(MultiScaleNet), (6, 33, 17), [(3, 16, 9)]),
}


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name, (make, shape, chunkings) in CASES.items():
        model = make()
        vol = random_volume(shape, seed=len(name))
        out[name] = (model, vol, chunkings, whole_volume(model, vol))
    return out


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("name", list(CASES))
def test_exact_equals_whole_volume(cases, name, scheduler):
    model, vol, chunkings, ref = cases[name]
    for chunks in chunkings:
        y = volarray.predict(model, vol, chunks=chunks)
        assert y.shape == ref.shape
        assert y.chunks[1:] == tuple(da.core.normalize_chunks(chunks, vol.shape[-3:]))
        assert_volume_close(y.compute(scheduler=scheduler), ref, atol=1e-5)


@pytest.mark.parametrize("name", ["FaultSeg3D", "MultiScaleNet"])
def test_exact_on_distributed_local_cluster(cases, local_cluster, name):
    model, vol, chunkings, ref = cases[name]
    y = volarray.predict(model, vol, chunks=chunkings[-1])
    assert_volume_close(local_cluster.compute(y).result(), ref, atol=1e-5)


def test_planner_chosen_chunks(cases):
    model, vol, _, ref = cases["FaultSeg3D"]
    y = volarray.predict(model, vol, memory_limit="8MB")
    assert y.numblocks[1:] != (1, 1, 1)  # the budget forced a split
    assert_volume_close(y.compute(), ref)


def test_dask_and_zarr_inputs(cases, tmp_path):
    zarr = pytest.importorskip("zarr")
    model, vol, _, ref = cases["MultiScaleNet"]
    dvol = da.from_array(vol, chunks=(5, 9, 8))
    assert_volume_close(volarray.predict(model, dvol, chunks=(10, 10, 10)).compute(), ref)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=vol.shape,
                        chunks=(7, 7, 7), dtype="f4")
    z[:] = vol
    assert_volume_close(volarray.predict(model, z, chunks=(11, 13, 9)).compute(), ref)


def test_float64_volume_runs_in_model_precision(cases):
    model, vol, _, ref = cases["MultiScaleNet"]
    out = volarray.predict(model, vol.astype(np.float64), chunks=8).compute()
    assert out.dtype == np.float32
    assert_volume_close(out, ref)


def test_building_the_graph_computes_nothing(cases, monkeypatch):
    model, vol, _, ref = cases["FaultSeg3D"]
    calls = []
    orig = volarray.worker.ModelRunner.run
    monkeypatch.setattr(volarray.worker.ModelRunner, "run",
                        lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))

    def explode(block):
        raise AssertionError("the input was read while building the graph")
    poisoned = da.from_array(vol, chunks=8).map_blocks(explode, dtype=vol.dtype)
    volarray.predict(model, poisoned, chunks=16)
    volarray.plan(model, poisoned, chunks=16)
    assert calls == []
    y2 = volarray.predict(model, vol, chunks=16)
    assert calls == []
    assert_volume_close(y2.compute(scheduler="sync"), ref)
    assert calls


def test_graph_keys_are_deterministic(cases):
    model, vol, _, _ = cases["MultiScaleNet"]
    a = volarray.predict(model, vol, chunks=8)
    b = volarray.predict(model, vol, chunks=8)
    c = volarray.predict(model, vol, chunks=9)
    assert a.name == b.name != c.name


def test_tasks_hold_the_model_once(cases):
    model, vol, _, _ = cases["FaultSeg3D"]
    y = volarray.predict(model, vol, chunks=8)
    graph = dict(y.__dask_graph__())
    runners = {k for k, v in graph.items() if isinstance(v, volarray.worker.ModelRunner)
               or type(getattr(v, "value", None)).__name__ == "ModelRunner"}
    assert len(runners) == 1
