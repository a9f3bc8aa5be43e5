"""Many workers: weights once per worker, surviving a lost worker, GPU placement."""
import os
import time

import cloudpickle
import numpy as np
import pytest
import torch

import volarray
from volarray.models import FaultSeg3D, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


def test_graph_holds_the_weights_once():
    model = seeded(FaultSeg3D)
    vol = random_volume((64, 64, 64), seed=1)
    y = volarray.predict(model, vol, chunks=16)
    assert y.npartitions == 64
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    graph = dict(y.__dask_graph__())
    volume_bytes = vol.nbytes  # the input array is embedded in the graph by from_array
    size = len(cloudpickle.dumps(graph)) - volume_bytes
    assert size <= 1.5 * weights + 1e6, (size, weights)


def test_survives_a_lost_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    model = seeded(FaultSeg3D, width=8)
    vol = random_volume((48, 48, 40), seed=2)
    ref = whole_volume(model, vol)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        y = volarray.predict(model, vol, chunks=8)
        future = client.compute(y)
        victim = None
        deadline = time.time() + 60
        while time.time() < deadline and victim is None:  # once work is under way ...
            processing = client.processing()
            busy = [w for w, keys in processing.items() if keys]
            if busy and len(client.who_has()) > 20:
                victim = busy[0]
            time.sleep(0.05)
        assert victim is not None
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, 9)  # ... a worker process dies; its nanny starts a new one
        out = future.result(timeout=240)
    assert_volume_close(out, ref)


def test_gpu_tasks_carry_a_gpu_resource():
    from volarray.execute import build_graph
    from volarray.io import as_dask_volume
    model = seeded(FaultSeg3D, width=4)
    arr = as_dask_volume(random_volume((16, 16, 16)))
    plan = volarray.plan(model, arr, chunks=8)
    y = build_graph(plan, arr.rechunk((1, 8, 8, 8)), "cuda")  # built, never run here
    layer = y.__dask_graph__().layers[y.name]
    assert layer.annotations == {"resources": {"GPU": 1}}
    y = build_graph(plan, arr.rechunk((1, 8, 8, 8)), "cpu")
    assert not y.__dask_graph__().layers[y.name].annotations


def test_one_named_layer_per_stage_and_barrier():
    """Each stage and barrier is a layer named by its key prefix (what dask's dashboard
    shows); statistics tiles run on the GPU, their combine tree does not, nor do the
    tasks that pick up statistics a stage's tiles computed; the combine fan-in follows
    dask's split_every setting."""
    import dask
    from volarray.execute import build_graph
    from volarray.io import as_dask_volume
    from volarray.models.norms import InstanceNormUNet
    torch.manual_seed(0)
    model = InstanceNormUNet(width=4).eval()
    arr = as_dask_volume(random_volume((16, 16, 16)))
    plan = volarray.plan(model, arr, chunks=4)
    layers = build_graph(plan, arr, "cuda").__dask_graph__().layers
    for stage in plan.stages:
        assert any(n.startswith(f"volarray-stage-{stage.index}-") for n in layers)
    stats = [n for n in layers if n.startswith("volarray-stats-")]
    assert len(stats) == 2 * len(plan.barriers) > 0
    assert any(b.by_stage is not None for b in plan.barriers)
    assert any(b.by_stage is None for b in plan.barriers)
    for name in stats:
        gpu = layers[name].annotations == {"resources": {"GPU": 1}}
        barrier = plan.barriers[int(name.split("-")[2])]
        assert gpu == ("-combine-" not in name and barrier.by_stage is None), name
    sizes = {}
    for split in (2, 16):
        with dask.config.set(split_every=split):
            graph = build_graph(plan, arr, "cpu").__dask_graph__()
        sizes[split] = sum(len(graph.layers[n]) for n in graph.layers if "-combine-" in n)
    assert sizes[2] > sizes[16]


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.05)])
def test_reduced_precision_under_autocast(dtype, tol):
    model = seeded(FaultSeg3D, width=8)
    vol = random_volume((24, 24, 24), seed=3)
    ref = whole_volume(model, vol)
    out = volarray.predict(model, vol, chunks=12, compute_dtype=dtype).compute()
    assert out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert 0 < err < tol  # reduced precision really ran, and stays close


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_on_gpu():
    model = seeded(FaultSeg3D)
    vol = random_volume((64, 48, 40), seed=4)
    out = volarray.predict(model, vol, chunks=(32, 24, 40), device="cuda").compute()
    assert_volume_close(out, whole_volume(model, vol), atol=1e-4)


def test_lazy_keep_budget_is_the_clusters_memory(local_cluster):
    """With a default distributed client, a lazy predict's keep budget is an eighth of
    its workers' memory, not of the machine that builds the graph."""
    import psutil
    from distributed import Client
    from volarray.budget import run_memory
    assert run_memory() == psutil.virtual_memory().total  # no default client
    workers = local_cluster.scheduler_info()["workers"].values()
    with Client(local_cluster.scheduler.address, set_as_default=True):
        assert run_memory() == sum(w["memory_limit"] for w in workers)


def test_layer_names_and_keys_say_what_runs(tmp_path):
    """Layers are named by what runs (``volarray-stage-N-<op>``, ``volarray-stats-N``,
    ``volarray-write``), so that dask's dashboard (task prefixes: ``volarray-stage``,
    ``volarray-stats``, ``volarray-write``) shows volarray's phases; the same call
    gives the same keys (tokenize)."""
    import re
    from dask.callbacks import Callback
    from dask.utils import key_split
    from volarray.models.norms import InstanceNormUNet
    model = seeded(InstanceNormUNet, width=4)
    vol = random_volume((16, 16, 16))
    y = volarray.predict(model, vol, chunks=8)
    names = list(y.__dask_graph__().layers)
    token = r"-[0-9a-f]{32}$"
    assert any(re.match(r"volarray-stage-0-conv" + token, n) for n in names), names
    assert any(re.match(r"volarray-stats-0" + token, n) for n in names), names
    assert any(re.match(r"volarray-stats-0-combine" + token, n) for n in names), names
    assert volarray.predict(model, vol, chunks=8).name == y.name
    assert list(volarray.predict(model, vol, chunks=8).__dask_graph__().layers) == names
    ran = set()

    class Keys(Callback):
        def _pretask(self, key, dsk, state):
            ran.add(key_split(key))
    with Keys():
        volarray.predict_to_zarr(model, vol, str(tmp_path / "o.zarr"), chunks=8,
                                 scheduler="sync")
    assert {"volarray-stage", "volarray-stats", "volarray-write"} <= ran
