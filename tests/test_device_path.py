"""Issue 32, items 4, 5 and 10 as a CPU can check them: a half-precision plan runs in
its dtype (the model cast once per runner, no per-op casts), integer volumes cross to
the device as they are, the finiteness check runs on the device tensor, per-plan
bookkeeping is computed once, and CuPy in and out (its errors without CuPy or CUDA; the
DLPack path with a stand-in). The same checks on a GPU are in test_gpu.py."""
import dask
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import volarray
from volarray import devices, worker
from volarray.models import FaultSeg3D, seeded

from conftest import random_volume, whole_volume


class Casts(TorchDispatchMode):
    """Counts the ops whose result has another dtype than their first tensor input."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                and out.dtype != args[0].dtype):
            self.casts += 1
        return out


def task_count(y) -> int:
    return sum(1 for v in dict(y.__dask_graph__()).values()
               if isinstance(v, tuple) and v and v[0] in (worker.run_task, worker.stats_task))


# ------------------------------------------------------------------ 4a. no per-op casts
def test_half_plan_casts_only_at_a_tasks_ends():
    model = seeded(FaultSeg3D, width=4)
    vol = random_volume((16, 16, 32), seed=2)
    y = volarray.predict(model, vol, chunks=16, keep="4x", compute_dtype="float16")
    first = y.compute(scheduler="sync")  # the runner's model is cast here, once
    with Casts() as mode, dask.config.set(scheduler="sync"):
        again = y.compute()
    np.testing.assert_array_equal(first, again)
    assert np.abs(again - whole_volume(model, vol)).max() < 0.05
    # per task: its sources cast in, its result cast out (autocast cast every conv's
    # input and weights: ~25 per task of this 15-conv model)
    assert mode.casts <= 3 * task_count(y), (mode.casts, task_count(y))


def test_model_cast_once_per_runner_and_the_callers_left_alone():
    model = seeded(FaultSeg3D, width=4)
    before = {k: (v, v.detach().clone()) for k, v in model.named_parameters()}
    plan = volarray.Exact(model, chunks=16, compute_dtype="bfloat16").plan(
        random_volume((32, 32, 32)))
    runner = worker.ModelRunner(plan, "cpu")
    assert runner.dtype == torch.bfloat16
    held = runner.model
    assert held is runner.model  # cached: cast once
    assert {p.dtype for p in held.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plan.graph.gm.parameters()} == {torch.float32}
    for k, v in model.named_parameters():
        assert v is before[k][0] and v.dtype == torch.float32 and torch.equal(v, before[k][1])
    import pickle
    shipped = pickle.loads(pickle.dumps(runner))  # a worker's copy casts its own, once
    assert shipped.model is shipped.model and shipped.model is not held


def test_float32_plan_keeps_the_model_as_it_is():
    model = seeded(FaultSeg3D, width=4)
    plan = volarray.Exact(model, chunks=16).plan(random_volume((16, 16, 16)))
    runner = worker.ModelRunner(plan, "cpu")
    assert runner.dtype == torch.float32 and runner.model is plan.graph.gm


# ------------------------------------------------------------------ 4b. integers cross as they are
def test_integer_volume_crosses_in_its_own_dtype(monkeypatch):
    model = seeded(FaultSeg3D, width=4)
    ints = np.random.default_rng(3).integers(-300, 300, (24, 16, 16)).astype(np.int16)
    seen = []

    def spy(a, device):
        seen.append(a.dtype)
        return devices.to_device(a, device)
    monkeypatch.setattr(worker, "to_device", spy)
    got = volarray.predict(model, ints, chunks=(8, 16, 16)).compute(scheduler="sync")
    assert np.dtype(np.int16) in seen
    monkeypatch.undo()
    want = volarray.predict(model, ints.astype(np.float32), chunks=(8, 16, 16)).compute()
    np.testing.assert_array_equal(got, want)  # cast on the device: the same numbers


class Recorded(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
            self.calls.append((args[0].device.type, args[0].dtype, out.device.type, out.dtype))
        return out


def test_integers_move_first_and_are_cast_on_the_device():
    """To another device ('meta' stands for the GPU) the int16 bytes cross, and the cast
    runs where they arrived."""
    a = np.arange(2 * 4 * 3 * 5, dtype=np.int16).reshape(2, 4, 3, 5)
    t = devices.to_device(a, "cpu")
    assert t.dtype == torch.int16 and t.shape == (1, 2, 4, 3, 5)
    assert t.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_array_equal(t[0].numpy(), a)
    with Recorded() as rec:
        devices.to_device(a, "meta").to(torch.float16)
    moves = [c for c in rec.calls if c[0] != c[2]]
    casts = [c for c in rec.calls if c[1] != c[3]]
    assert moves == [("cpu", torch.int16, "meta", torch.int16)]
    assert casts and all(c[0] == "meta" for c in casts)


# ------------------------------------------------------------------ 4c. finiteness on the device
def test_finiteness_is_checked_on_the_device_tensor_naming_the_voxel(monkeypatch):
    checked = []

    def spy(t, origin):
        checked.append((type(t), origin))
        return devices.check_finite(t, origin)
    monkeypatch.setattr(worker, "check_finite", spy)
    vol = random_volume((16, 16, 24))
    vol[9, 4, 21] = np.nan
    with pytest.raises(volarray.InputError, match=r"NaN at channel 0, voxel \(z, y, x\) = "
                                                  r"\(9, 4, 21\)"):
        volarray.predict(seeded(FaultSeg3D, width=4), vol, chunks=8).compute(scheduler="sync")
    assert checked and {t for t, _ in checked} == {torch.Tensor}


def test_the_devices_check_one_reduction_then_value_by_value():
    """The path a GPU takes (any dtype but the CPU's float types): a sum that overflows
    is not taken for an Inf; a NaN is found and named."""
    t = torch.full((1, 2, 3, 4, 5), 3e38, dtype=torch.bfloat16)
    devices.check_finite(t)
    t[0, 1, 2, 0, 4] = float("nan")
    with pytest.raises(volarray.InputError, match=r"NaN at channel 1, .* = \(12, 0, 5\)"):
        devices.check_finite(t, (10, 0, 1))


def test_a_large_finite_value_is_not_called_inf_in_half_precision():
    """Checked before the cast: 1e5 is finite, though float16 holds it as Inf."""
    model = seeded(FaultSeg3D, width=4)
    plan = volarray.Exact(model, chunks=16, compute_dtype="float16").plan(
        random_volume((16, 16, 16)))
    runner = worker.ModelRunner(plan, "cpu")
    a = np.full((1, 4, 4, 4), 1e5, np.float32)
    t = runner.on_device_input(runner.input_name, a)
    assert t.dtype == torch.float16 and torch.isinf(t).all()
    a[0, 1, 2, 3] = -np.inf
    with pytest.raises(volarray.InputError, match=r"-Inf at channel 0, .* = \(11, 2, 4\)"):
        runner.on_device_input(runner.input_name, a, {runner.input_name: (10, 0, 1)})


# ------------------------------------------------------------------ 10. DLPack in
class DLPackOnly:
    """A stand-in for a CuPy array: only the DLPack protocol."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_an_array_with_dlpack_goes_in_without_numpy():
    a = random_volume((2, 5, 4, 3))
    t = devices.to_device(DLPackOnly(a), "cpu")
    assert t.shape == (1, 2, 5, 4, 3) and t.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_array_equal(t[0].numpy(), a)


# ------------------------------------------------------------------ 10. CuPy out: its refusals
def test_cupy_output_is_refused_on_the_cpu_before_anything_runs():
    model = seeded(FaultSeg3D, width=4)
    with pytest.raises(volarray.InputError, match=r"output_array='cupy' .*device='cpu'.*"
                                                  r"device='cuda'"):
        volarray.predict(model, random_volume((16, 16, 16)), output_array="cupy")
    with pytest.raises(volarray.InputError, match=r"output_array='host' is not one of"):
        volarray.predict(model, random_volume((16, 16, 16)), output_array="host")


def test_cupy_output_without_cupy_says_how_to_install_it(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_cupy(name, *a, **k):
        if name.split(".")[0] == "cupy":
            raise ImportError("No module named 'cupy'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(volarray.InputError, match=r"needs CuPy.*pip install cupy-cuda12x.*"
                                                  r"output_array='numpy'") as e:
        devices.check_output_array("cupy", "cuda:0")
    assert e.value.parameter == "output_array"


def test_predict_to_zarr_refuses_cupy_output(tmp_path):
    with pytest.raises(volarray.InputError, match="only volarray.predict returns CuPy"):
        volarray.predict_to_zarr(seeded(FaultSeg3D, width=4), random_volume((16, 16, 16)),
                                 tmp_path / "o.zarr", output_array="cupy")


# ------------------------------------------------------------------ 5. bookkeeping once per plan
def test_requirements_are_computed_once_per_axis_interval(monkeypatch):
    import pickle
    from volarray.geometry import grid_boxes
    from volarray.program import TileProgram
    model = seeded(FaultSeg3D, width=4)
    plan = volarray.plan(model, random_volume((32, 32, 32)), chunks=8, keep=0)
    stage = plan.stages[-1]
    prog = pickle.loads(pickle.dumps(stage.program))  # as a worker gets it: nothing memoized
    walks = []
    real = TileProgram._requirements_1d

    def counted(self, axis, out):
        walks.append((axis, out))
        return real(self, axis, out)
    monkeypatch.setattr(TileProgram, "_requirements_1d", counted)
    boxes = [b for _, b in grid_boxes(stage.bounds)]
    for box in boxes:
        first = prog.requirements(box)
        assert prog.requirements(box).node == first.node
    per_axis = {(a, iv) for box in boxes for a, iv in enumerate(box.axes)}
    assert len(boxes) == 64 and len(walks) == len(per_axis) == 12  # 4 per axis, not 3 x 64
