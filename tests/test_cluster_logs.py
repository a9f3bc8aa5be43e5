"""On a distributed cluster of worker processes, every front door runs without an
ERROR, a traceback or a warning in any log (the client's, the scheduler's, the
workers' and their nannies', and the workers' stderr), and gives the sync scheduler's
numbers. What tasks need reaches the workers as plain picklable data: a captured
GraphModule handed to distributed's serializer made it log an ERROR traceback per
stage (fx's generated class does not pickle) before it fell back to cloudpickle."""
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.models.norms import InstanceNormUNet

from conftest import random_volume, restore_environment

distributed = pytest.importorskip("distributed")

# lines of the cluster's own machinery on a loaded machine, not caused by a graph
BENIGN = ("Event loop was unresponsive", "full garbage collections took",
          "Creating scratch directories is taking a surprisingly long time")
ALARMING = (" - WARNING - ", " - ERROR - ", " - CRITICAL - ", "Traceback", "Warning:")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(f"{record.name} - {record.levelname} - {record.getMessage()}")


def alarming(lines):
    return [line for line in lines if not any(b in line for b in BENIGN)]


@pytest.fixture(scope="module")
def cluster():
    before = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", worker_dashboard_address=":0") as c:
        restore_environment(before)
        with distributed.Client(c) as client:  # the default client: front doors use it
            yield client


@pytest.fixture
def clean_logs(cluster, capfd):
    """Fails the test on any alarming line in the client process's distributed loggers,
    in the scheduler's, workers' or nannies' logs, or on the workers' stderr."""
    handler = Records()
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    try:
        yield cluster
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err.splitlines()  # worker processes write to this stderr
    lines = handler.lines + [line for line in err if any(a in line for a in ALARMING)]
    for logs in (cluster.get_worker_logs(), cluster.get_worker_logs(nanny=True),
                 {"scheduler": cluster.get_scheduler_logs()}):
        for who, entries in logs.items():
            lines += [f"{who}: {level} {msg}" for level, msg in entries
                      if level in ("WARNING", "ERROR", "CRITICAL") or "Traceback" in msg]
    assert not alarming(lines), "\n".join(alarming(lines))


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    d = tmp_path_factory.mktemp("survey")
    vol = random_volume((16, 24, 32), seed=7)
    zarr.open_group(str(d / "in.zarr"), mode="w").create_array(
        "amplitude", data=vol, chunks=(16, 16, 16))
    return d, vol


class Scaled(torch.nn.Module):
    """A computation on parameters only (``s.exp()``): a constant the workers evaluate
    from the traced graph's nodes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.s = torch.nn.Parameter(torch.randn(1, 4, 1, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.s.exp() + 1


MODEL = {"faults": lambda: seeded(FaultSeg3D, width=4),
         "norms": lambda: seeded(InstanceNormUNet, width=4),
         "constants": lambda: seeded(Scaled)}


def sync_result(model, vol):
    return volarray.predict(model, vol, chunks=16).compute(scheduler="sync")


def same(out, ref):
    assert out.shape == ref.shape
    assert np.abs(np.asarray(out) - ref).max() <= 1e-6


@pytest.mark.parametrize("kind", ["faults", "constants"])
def test_compute(clean_logs, survey, kind):
    _, vol = survey
    model = MODEL[kind]()
    same(volarray.predict(model, vol, chunks=16).compute(), sync_result(model, vol))


def test_dask_to_zarr(clean_logs, survey, tmp_path):
    _, vol = survey
    model = MODEL["faults"]()
    volarray.predict(model, vol, chunks=16).to_zarr(str(tmp_path / "y.zarr"))
    same(zarr.open_array(str(tmp_path / "y.zarr"), mode="r")[...], sync_result(model, vol))


def test_predict_to_zarr(clean_logs, survey, tmp_path):
    d, vol = survey
    model = MODEL["norms"]()
    out = volarray.predict_to_zarr(model, str(d / "in.zarr"), str(tmp_path / "y.zarr"),
                                   var="amplitude", chunks=16, scheduler=clean_logs)
    same(out[...], sync_result(model, vol))


def test_accessor(clean_logs, survey, tmp_path):
    _, vol = survey
    model = MODEL["faults"]()
    ds = xr.Dataset({"amplitude": (("z", "y", "x"), vol)}).chunk(16)
    ds = ds.volinfer.predict(model, var="amplitude", name="fault", chunks=16)
    ds[["fault"]].to_zarr(str(tmp_path / "f.zarr"), consolidated=False)
    out = xr.open_zarr(str(tmp_path / "f.zarr"), consolidated=False).fault.values
    same(out[None], sync_result(model, vol))


def test_the_model_key_pickles_without_its_graph_module():
    """The model key pickles with plain pickle (what distributed tries first), holding
    the traced module as bytes: distributed's serializer never meets it. Unpickled, the
    module is re-traced from its code (its nodes named anew): constants computed from
    parameters are found by position."""
    y = volarray.predict(MODEL["constants"](), random_volume((16, 16, 16)), chunks=8)
    graph = dict(y.__dask_graph__())
    runner = next(v for k, v in graph.items() if str(k).startswith("volarray-model-"))
    state = runner.__getstate__()
    assert isinstance(state["gm_bytes"], bytes)
    assert not any(isinstance(v, torch.nn.Module) for v in state.values())
    copy = pickle.loads(pickle.dumps(graph))
    again = next(v for k, v in copy.items() if str(k).startswith("volarray-model-"))
    assert len(again.gm.graph.nodes) == len(runner.gm.graph.nodes)
    constants = [p for p in runner.node_names if p.startswith("exp")]
    assert constants, runner.node_names
    torch.testing.assert_close(again.attr("@" + constants[0]), runner.attr("@" + constants[0]),
                               rtol=0, atol=0)
