"""Models on any device and dtype, execution strategies, device budgets, tasks in flight
per device and TF32: what a CPU can check of the GPU engine (issue 32). The GPU runs
themselves are in test_gpu.py."""
import threading
import time

import dask
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import volarray
import volarray.devices as devices
import volarray.runners as runners
from volarray.models import FaultSeg3D, seeded
from volarray.ops.conv import Conv

from conftest import random_volume, whole_volume


class CountConvs(TorchDispatchMode):
    """Counts convolution launches (any convolution kernel: aten's, oneDNN's) and
    records the TF32 flags each one ran under."""

    def __init__(self):
        super().__init__()
        self.count, self.flags = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "convolution" in func.__name__:
            self.count += 1
            self.flags.add((torch.backends.cuda.matmul.allow_tf32,
                            torch.backends.cudnn.allow_tf32))
        return func(*args, **(kwargs or {}))


def model_convs(model) -> int:
    return sum(isinstance(m, torch.nn.Conv3d) for m in model.modules())


def convs_per_task(stage) -> int:
    prog = stage.program
    return sum(isinstance(prog.nodes[n].op, Conv) for n in prog.order)


# ------------------------------------------------------------------ 1. any model, any device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_runs_exact_and_is_left_as_it_was(dtype):
    model = seeded(FaultSeg3D, width=4).to(dtype)
    params = {k: (v, v.detach().clone()) for k, v in model.named_parameters()}
    vol = random_volume((24, 16, 24), seed=1)
    print(volarray.plan(model, vol, chunks=(16, 16, 8)))
    out = volarray.predict(model, vol, chunks=(16, 16, 8)).compute()
    with torch.inference_mode():
        ref = model(torch.from_numpy(vol)[None, None].to(dtype))[0].float().numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-2)
    for k, v in model.named_parameters():  # the same tensors, unchanged
        assert v is params[k][0] and v.dtype == dtype and v.device.type == "cpu"
        assert torch.equal(v, params[k][1])


def test_captures_and_probes_are_made_on_the_models_device(monkeypatch):
    asked = []

    def spy(module):
        asked.append(type(module).__name__)
        return torch.device("cpu")
    monkeypatch.setattr(devices, "input_device", spy)
    model = seeded(FaultSeg3D, width=4)
    volarray.plan(model, random_volume((16, 16, 16)))
    # the fx capture: the self-check's probe (its whole-volume run is on meta tensors)
    assert asked == ["FaultSeg3D"], asked
    asked.clear()
    from volarray import trace
    monkeypatch.setattr(trace, "fast_trace", lambda *a: None)
    volarray.plan(seeded(FaultSeg3D, width=4), random_volume((16, 16, 16)))
    # torch.export's fake input and the self-check's probe for the model itself, the
    # whole-volume fake run for its capture
    assert asked.count("FaultSeg3D") >= 2 and len(asked) >= 3, asked


def test_a_model_elsewhere_is_copied_not_moved(monkeypatch):
    model = seeded(FaultSeg3D, width=4)
    plan = volarray.plan(model, random_volume((16, 16, 16)))
    from volarray.worker import ModelRunner
    assert devices.model_on(model, "cpu") is model  # already there: no copy
    assert ModelRunner(plan, "cpu").model is plan.graph.gm
    # weights that report another device than the run's: copied, never moved
    monkeypatch.setattr(devices, "module_device", lambda m: torch.device("cuda", 1))
    copy = devices.model_on(model, "cpu")
    assert copy is not model
    assert all(a is not b and torch.equal(a, b)
               for a, b in zip(copy.parameters(), model.parameters()))
    runner = ModelRunner(plan, "cpu")  # a worker's shipped model: its own copy
    assert runner.model is not plan.graph.gm
    assert all(a is not b for a, b in zip(runner.model.parameters(),
                                          plan.graph.gm.parameters()))


def test_default_device_follows_the_model():
    model = seeded(FaultSeg3D, width=4)
    assert devices.default_device(model) is None
    assert volarray.Exact(model).device == "cpu"


# ------------------------------------------------------------------ 2. the strategy
def count_run(exact, vol):
    counter = CountConvs()
    arr = exact(vol)
    with counter, dask.config.set(scheduler="sync"):
        out = arr.compute()
    return out, counter.count


def test_whole_strategy_runs_each_conv_once_per_task(monkeypatch):
    import dataclasses
    import volarray.costing as costing

    def thinnest(graph, stage, shapes, target, unit, limit=None):  # every task swept
        if stage.chunk_shape[0] > unit and stage.program.order:
            return dataclasses.replace(stage, slab=unit, peak_bytes=costing.sweep_bytes(
                graph, stage, shapes, unit)[1])
        return stage
    monkeypatch.setattr(costing, "choose_slab", thinnest)
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((32, 32, 32), seed=2)
    ref = whole_volume(model, vol)
    slab = volarray.Exact(model, chunks=(32, 16, 16), keep=0)
    whole = volarray.Exact(model, chunks=(32, 16, 16), strategy="whole", keep=0)
    p_slab, p_whole = slab.plan(vol), whole.plan(vol)
    assert p_slab.strategy == "slab" and any(s.slab for s in p_slab.stages)
    assert p_whole.strategy == "whole" and not any(s.slab for s in p_whole.stages)
    assert "strategy whole" in str(p_whole)
    out_slab, n_slab = count_run(slab, vol)
    out_whole, n_whole = count_run(whole, vol)
    per_task = sum(s.n_tasks * convs_per_task(s) for s in p_whole.stages)
    assert n_whole == per_task  # every conv of a task's stage: one launch
    assert all(convs_per_task(s) == model_convs(model) for s in p_whole.stages)
    assert n_slab > sum(s.n_tasks * convs_per_task(s) for s in p_slab.stages)
    np.testing.assert_allclose(out_whole, ref, atol=1e-5)
    np.testing.assert_allclose(out_slab, ref, atol=1e-5)


def test_whole_strategy_launches_within_4x_the_models_forward():
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((48, 40, 32), seed=3)
    out, n = count_run(volarray.Exact(model, strategy="whole"), vol)
    assert n <= 4 * model_convs(model)
    np.testing.assert_allclose(out, whole_volume(model, vol), atol=1e-5)


def test_strategy_is_checked():
    with pytest.raises(volarray.InputError, match="strategy='tiles'"):
        volarray.Exact(seeded(FaultSeg3D, width=4), strategy="tiles")


# ------------------------------------------------------------------ 3. device budgets
@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees 3 GPUs of 80 GB with 60, 40 and 70 GB free; nothing runs on them."""
    free = {0: 60e9, 1: 40e9, 2: 70e9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda d=None: (free[torch.device(d).index or 0], 80e9))
    return free


def test_plan_on_a_gpu_takes_its_budget_from_the_device(fake_gpus):
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((32, 32, 32))
    margin = max(devices.DEVICE_MARGIN * 80e9, devices.DEVICE_MARGIN_MIN)
    want = int((60e9 - devices.module_bytes(model) - margin) // devices.IN_FLIGHT)
    p = volarray.plan(model, vol, device="cuda:0")
    assert p.memory_limit == want and p.device == "cuda:0" and p.strategy == "whole"
    text = str(p)
    assert "device cuda:0" in text and "from cuda:0: 60.0 GB free" in text
    assert "over 2 tasks in flight" in text
    every = volarray.plan(model, vol, device="cuda")  # the smallest budget of all GPUs
    assert every.memory_limit == int((40e9 - devices.module_bytes(model) - margin) // 2)
    assert "from cuda:1" in str(every)
    given = volarray.plan(model, vol, device="cuda", memory_limit="1GB")
    assert given.memory_limit == 10 ** 9 and "GB free" not in str(given)


def test_device_specs(fake_gpus):
    assert devices.resolve_device("cuda") == "cuda"
    assert devices.device_names("cuda") == ("cuda:0", "cuda:1", "cuda:2")
    assert devices.resolve_device("cuda:0, 2") == "cuda:0,2"
    assert devices.device_names("cuda:0,2") == ("cuda:0", "cuda:2")
    for bad in ("cuda:3", "cuda:0,0", "cuda:", "tpu"):
        with pytest.raises(volarray.InputError, match="device="):
            devices.resolve_device(bad)


# ------------------------------------------------------------------ 4. tasks in flight
def test_at_most_two_tasks_in_flight_per_device():
    slots = devices.DeviceSlots()
    names = tuple(f"cuda:{i}" for i in range(3))
    lock, now, seen = threading.Lock(), {}, []

    def task():
        with slots.use(names) as d:
            with lock:
                now[d] = now.get(d, 0) + 1
                seen.append(now[d])
            time.sleep(0.02)
            with lock:
                now[d] -= 1
    threads = [threading.Thread(target=task) for _ in range(18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(seen) == 2 and set(slots.peak) == set(names)
    assert all(v == 2 for v in slots.peak.values())
    assert sum(slots.started.values()) == 18 and min(slots.started.values()) >= 4


def test_cuda_spreads_tasks_over_every_visible_gpu(fake_gpus, monkeypatch):
    slots = devices.DeviceSlots()
    monkeypatch.setattr(runners, "SLOTS", slots)
    monkeypatch.setattr(runners, "torch_device", lambda name: "cpu")  # fake GPUs run on the CPU
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((32, 32, 32), seed=5)
    y = volarray.predict(model, vol, device="cuda", chunks=16, keep=0)
    with dask.config.set(scheduler="threads", num_workers=8):
        out = y.compute()
    np.testing.assert_allclose(out, whole_volume(model, vol), atol=1e-5)
    assert set(slots.started) == {"cuda:0", "cuda:1", "cuda:2"}
    assert max(slots.peak.values()) <= 2


# ------------------------------------------------------------------ 5. TF32
@pytest.mark.parametrize("compute_dtype,inside", [(None, False), ("tf32", True)])
def test_tf32_inside_tasks_and_flags_restored(compute_dtype, inside):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    user = (not inside, not inside)  # the caller's setting, the opposite of the tasks'
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = user
        counter = CountConvs()
        model = seeded(FaultSeg3D, width=4)
        vol = random_volume((16, 16, 16))
        y = volarray.predict(model, vol, compute_dtype=compute_dtype)
        with counter, dask.config.set(scheduler="sync"):  # the mode is per thread
            out = y.compute()
        assert counter.flags == {(inside, inside)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == user
        np.testing.assert_allclose(out, whole_volume(model, vol), atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------ 6. half-precision scratch
def test_float16_plan_keeps_half_the_bytes_in_float16_scratch(tmp_path):
    from volarray.location import Location
    from volarray.store import ScratchSpace
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((32, 32, 32))
    plans = {dt: volarray.Exact(model, chunks=16, keep="4x", compute_dtype=dt).plan(vol)
             for dt in ("float32", "float16")}
    assert len(plans["float16"].stages) > 1
    assert plans["float16"].kept_bytes * 2 == plans["float32"].kept_bytes
    for dt, p in plans.items():
        arrays = ScratchSpace(Location.of(str(tmp_path / f"{dt}.zarr")), True).arrays_for(p)
        assert {str(np.dtype(files.dtype)) for files in arrays.values()} == {dt}


def test_float16_run_keeps_float16_tensors_and_stays_close():
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((32, 32, 32), seed=6)
    exact = volarray.Exact(model, chunks=16, keep="4x", compute_dtype="float16")
    assert len(exact.plan(vol).stages) > 1
    y = exact(vol)
    graph = dict(y.__dask_graph__())
    kept = {k[0] for k in graph if isinstance(k, tuple) and k[0] != y.name
            and k[0].startswith("volarray-") and len(k) == 5}
    assert kept
    from dask.local import get_sync
    chunk = get_sync(graph, (sorted(kept)[0], 0, 0, 0, 0))  # a kept tensor, as passed on
    assert chunk.dtype == np.float16
    out = y.compute()
    assert out.dtype == np.float32
    assert np.abs(out - whole_volume(model, vol)).max() < 0.05
