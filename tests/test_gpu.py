"""On a GPU (``pytest -m gpu``; skipped without CUDA): issue 32's done-when checks that
a short run can make. A model as GPU users hold it (``model.cuda()``, ``.half()``) in
every front door; float32 exact with TF32 off against whole-volume torch; the whole
strategy's launches per task. Speed against torchseis is benchmarks/bench_gpu.py's."""
import subprocess
import sys

import dask
import numpy as np
import pytest
import torch

import volarray
from volarray.models import FaultSeg3D, InstanceNormUNet, seeded

from conftest import random_volume

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def on_gpu(model, vol, dtype=torch.float32):
    """The reference: the model's own whole-volume forward on the GPU, TF32 off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x = torch.from_numpy(vol)[None, None].to("cuda", dtype)
        with torch.inference_mode():
            return model(x)[0].float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_model_on_the_gpu_in_every_front_door(dtype, tmp_path):
    model = seeded(FaultSeg3D, width=8).to("cuda", dtype)
    before = [p.detach().clone() for p in model.parameters()]
    vol = random_volume((48, 40, 32), seed=1)
    ref = on_gpu(model, vol, dtype)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    p = volarray.plan(model, vol)
    assert p.device.startswith("cuda") and p.strategy == "whole"
    out = volarray.predict(model, vol).compute()
    assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max())
    import xarray as xr
    da = xr.DataArray(vol, dims=("z", "y", "x"))
    acc = da.volinfer.predict(model).compute()
    assert np.abs(acc.values[0] - ref[0]).max() <= tol * max(1.0, np.abs(ref).max())
    assert all(q.device.type == "cuda" and q.dtype == dtype and torch.equal(q, b)
               for q, b in zip(model.parameters(), before))  # never moved or changed


def test_cli_takes_a_model_on_the_gpu(tmp_path):
    import zarr
    (tmp_path / "gpumodels.py").write_text(
        "from volarray.models import FaultSeg3D\n"
        "def half():\n    return FaultSeg3D(width=4).cuda().half().eval()\n")
    torch.save(seeded(FaultSeg3D, width=4).half().state_dict(), tmp_path / "w.pt")
    zarr.save_array(str(tmp_path / "in.zarr"), random_volume((32, 32, 32)))
    r = subprocess.run([sys.executable, "-m", "volarray.cli", "predict", "in.zarr", "out.zarr",
                        "--model", "gpumodels:half", "--weights", "w.pt"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:" +
                            __import__("os").environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr
    assert np.isfinite(zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...]).all()


def test_float32_exact_tf32_off_and_restored():
    torch.backends.cudnn.allow_tf32 = True  # the caller's setting: TF32 on
    model = seeded(FaultSeg3D).cuda()
    vol = random_volume((96, 96, 96), seed=2)
    out = volarray.predict(model, vol, chunks=64).compute()
    ref = on_gpu(model, vol)
    assert np.abs(out - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())
    assert torch.backends.cudnn.allow_tf32  # put back
    norm = seeded(InstanceNormUNet).cuda()
    got = volarray.predict(norm, vol).compute()
    want = on_gpu(norm, vol)
    assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())


def test_whole_strategy_on_the_gpu_launches_within_4x_the_forward():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution" in func.__name__:
                Count.n += 1
            return func(*args, **(kwargs or {}))
    model = seeded(FaultSeg3D).cuda()
    vol = random_volume((128, 128, 128), seed=3)
    y = volarray.predict(model, vol, compute_dtype="float16")
    with Count(), dask.config.set(scheduler="sync"):
        y.compute()
    assert Count.n <= 4 * 15


def test_every_gpu_at_most_two_in_flight():
    from volarray import devices, runners
    slots = devices.DeviceSlots()
    runners.SLOTS, saved = slots, runners.SLOTS
    try:
        model = seeded(FaultSeg3D, width=8).cuda()
        vol = random_volume((64, 64, 64), seed=4)
        out = volarray.predict(model, vol, device="cuda", chunks=32, keep=0).compute()
    finally:
        runners.SLOTS = saved
    assert set(slots.started) == {f"cuda:{i}" for i in range(torch.cuda.device_count())}
    assert max(slots.peak.values()) <= 2
    assert np.abs(out - on_gpu(model, vol)).max() <= 2e-5


# ------------------------------------------------------------------ 4. data stays on the device
def test_half_run_casts_only_at_a_tasks_ends_on_the_gpu():
    from test_device_path import Casts, task_count
    model = seeded(FaultSeg3D, width=8).cuda()
    vol = random_volume((64, 64, 64), seed=5)
    y = volarray.predict(model, vol, chunks=32, keep="4x", compute_dtype="float16")
    first = y.compute(scheduler="sync")
    with Casts() as mode, dask.config.set(scheduler="sync"):
        again = y.compute()
    np.testing.assert_array_equal(first, again)
    assert mode.casts <= 3 * task_count(y)
    assert np.abs(again - on_gpu(model, vol)).max() < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_host_arrays_cross_pinned_and_integers_are_cast_on_the_gpu():
    from volarray.devices import check_finite, to_device
    a = np.random.default_rng(0).integers(-500, 500, (2, 16, 8, 4)).astype(np.int16)
    t = to_device(a, "cuda:0")
    assert t.device.type == "cuda" and t.dtype == torch.int16
    assert t.is_contiguous(memory_format=torch.channels_last_3d)
    np.testing.assert_array_equal(t[0].cpu().numpy(), a)
    f = to_device(a.astype(np.float32), "cuda:0")
    f[0, 1, 3, 2, 1] = float("inf")
    with pytest.raises(volarray.InputError, match=r"Inf at channel 1, .* = \(3, 2, 1\)"):
        check_finite(f)
    ints = np.random.default_rng(1).integers(0, 255, (32, 32, 32)).astype(np.uint8)
    model = seeded(FaultSeg3D, width=4).cuda()
    got = volarray.predict(model, ints, chunks=16).compute()
    want = volarray.predict(model, ints.astype(np.float32), chunks=16).compute()
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ 10. CuPy in and out
def test_cupy_chunks_in_and_out():
    cupy = pytest.importorskip("cupy")
    import dask.array as da
    model = seeded(FaultSeg3D, width=8).cuda()
    vol = random_volume((64, 48, 40), seed=6)
    ref = volarray.predict(model, vol, chunks=(32, 24, 40)).compute()
    gpu_in = da.from_array(vol, chunks=(32, 24, 20)).map_blocks(cupy.asarray)
    got = volarray.predict(model, gpu_in, chunks=(32, 24, 40)).compute()
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, ref)
    out = volarray.predict(model, gpu_in, chunks=(32, 24, 40), output_array="cupy")
    assert isinstance(out._meta, cupy.ndarray)
    chunk = out.blocks[0, 0, 0, 0].compute()
    assert isinstance(chunk, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(out.compute()), ref)
