#!/usr/bin/env python3
"""volarray on one GPU, side by side with plain torch and torchseis's memory-efficient forward
(the seed's anchor), on the same model class, weights and input, in one run.

Each step runs in its own process under a timeout and prints one RESULT line per measurement
as soon as it has it, so a step cut short still reports what it measured.
Dry run on a CPU: python benchmarks/bench_gpu.py --device cpu --small --out /tmp/g
"""
from __future__ import annotations

# torchseis is imported from a copy outside the project (never vendored): its package
# folder's parent on PYTHONPATH, or in TORCHSEIS_PATH
import os as _os
import sys as _sys

if _os.environ.get("TORCHSEIS_PATH"):
    _sys.path.insert(0, _os.environ["TORCHSEIS_PATH"])

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback

STEPS = {  # name: timeout s, in the order of what matters most
    "env": 60, "gpu_model": 60, "big1024": 170, "fp16_512": 90, "norms": 50, "cluster": 50, "fp32_512": 60,
    "exact256": 60, "zarr512": 60,
}
SIZES = {"small": {256: 48, 512: 64, 1024: 96}, "full": {256: 256, 512: 512, 1024: 1024}}


def emit(step, **kw):
    kw["step"] = step
    print("RESULT " + json.dumps(kw), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--deadline", type=float, default=480.0)
    ap.add_argument("--step")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--cpu-copies", action="store_true",
                    help="give volarray CPU copies of the models (as users hold them: on the GPU)")
    a = ap.parse_args()
    if a.step:
        return run_step(a)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    results = open(os.path.join(a.out, "results.jsonl"), "a")
    for step, limit in STEPS.items():
        if a.only and step not in a.only:
            continue
        left = a.deadline - (time.time() - t0)
        if left < 25:
            print(f"== {step}: skipped, {left:.0f} s left", flush=True)
            results.write(json.dumps({"step": step, "skipped": True}) + "\n")
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--step", step, "--out", a.out,
               "--device", a.device] + (["--small"] if a.small else []) + \
            (["--cpu-copies"] if a.cpu_copies else [])
        print(f"== {step} (limit {min(limit, left - 5):.0f} s)", flush=True)
        ts = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(limit, left - 5))
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        for line in out.splitlines():
            print(line, flush=True)
            if line.startswith("RESULT "):
                results.write(line[7:] + "\n")
        results.flush()
        tail = "\n".join(err.splitlines()[-25:])
        if rc != 0:
            print(f"-- {step} rc={rc}\n{tail}", flush=True)
        with open(os.path.join(a.out, "stderr.txt"), "a") as f:
            f.write(f"==== {step} rc={rc}\n{err[-6000:]}\n")
        print(f"== {step} done in {time.time() - ts:.1f} s, rc={rc}", flush=True)


# ---------------------------------------------------------------- helpers (in step processes)

def run_step(a):
    global torch, np, volarray, DEV, S
    import numpy as np
    import torch
    DEV = a.device
    S = SIZES["small" if a.small else "full"]
    torch.backends.cudnn.allow_tf32 = False  # exactness in fp32: TF32 would round inputs to 10 bits
    torch.backends.cuda.matmul.allow_tf32 = False
    import volarray
    globals().update(np=np, torch=torch, volarray=volarray,
                     HALF="float16" if DEV.startswith("cuda") else None)  # fp16 convs crawl on CPUs
    global CPU_COPIES
    CPU_COPIES = CPU_COPIES or os.path.exists(os.path.join(a.out, "cpu_copies.txt"))
    fn = globals()["step_" + a.step]
    try:
        fn(a)
    except Exception as e:  # noqa: BLE001 - report and go on to the next step
        emit(a.step, error=f"{type(e).__name__}: {str(e)[:600]}",
             tb=traceback.format_exc()[-2500:])
    emit(a.step, rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def sync():
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak():
    if DEV.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.startswith("cuda") else None


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return r, time.perf_counter() - t


def volume(n, seed=0):
    """A float32 numpy volume n^3 (made on the device: 1024^3 on a CPU takes long)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn((n, n, n), generator=g, device=DEV).cpu().numpy()


def torchseis_models():
    stubbed = False
    try:
        import triton  # noqa: F401
    except ImportError:  # import-only stand-in where there is no triton (CPU dry run)
        import types
        stubbed = True
        stub = types.ModuleType("triton")
        stub.jit = lambda f=None, **k: f if f else (lambda g: g)
        lang = types.ModuleType("triton.language")
        lang.constexpr = int
        stub.language = lang
        sys.modules["triton"], sys.modules["triton.language"] = stub, lang
    import torchseis.models as M
    if stubbed:  # torch's compiler imports triton for real when it is present
        del sys.modules["triton"], sys.modules["triton.language"]
    return M


def faultseg(seed=0):
    M = torchseis_models()
    torch.manual_seed(seed)
    return on_cpu_too(M.FaultSeg3d().eval())


def plain(model, x, half=False, rank=0):
    dt = torch.float16 if half else torch.float32
    t = torch.from_numpy(x)[None, None].to(DEV, dt)
    with torch.inference_mode():
        y = model(t, rank=rank) if rank else model(t)
        return y[0].float().cpu().numpy()


def va(model, x, scheduler="threads", num_workers=None, **kw):
    y = volarray.predict(CPU.get(id(model), model), x, device=DEV, **kw)
    kws = {"num_workers": num_workers} if num_workers else {}
    return np.asarray(y.compute(scheduler=scheduler, **kws))


def measure(step, name, fn, ref=None, **extra):
    """Time fn once (peak device memory reset first); emit time, peak and diff to ref."""
    reset_peak()
    try:
        y, s = timed(fn)
    except Exception as e:  # noqa: BLE001
        emit(step, engine=name, error=f"{type(e).__name__}: {str(e)[:600]}",
             tb=traceback.format_exc()[-2000:], **extra)
        return None
    d = {"engine": name, "s": round(s, 3), "peak_gpu_gb": peak_gb(), **extra}
    if ref is not None and y is not None:
        y = np.asarray(y).reshape(ref.shape)
        d["max_abs_diff"] = float(np.abs(y - ref).max())
        d["max_abs_ref"] = float(np.abs(ref).max())
        d["mean_abs_diff"] = float(np.abs(y - ref).mean())
    emit(step, **d)
    return y


CPU = {}  # with --cpu-copies: id of a model on the GPU -> a CPU copy, which volarray is given
CPU_COPIES = "--cpu-copies" in sys.argv  # how 2026-12-04's figures were taken: GPU models were refused


def on_cpu_too(model):
    if CPU_COPIES:
        import copy
        CPU[id(model)] = copy.deepcopy(model).cpu()
    return model


def plan_line(model, x, **kw):
    t = time.perf_counter()
    try:
        p = repr(volarray.plan(CPU.get(id(model), model), x, device=DEV, **kw))
    except Exception as e:  # noqa: BLE001
        p = f"plan failed: {type(e).__name__}: {str(e)[:400]}"
    return p, time.perf_counter() - t


# ---------------------------------------------------------------- steps

def step_env(a):
    import dask
    import zarr
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "volarray": volarray.__version__,
            "dask": dask.__version__, "zarr": zarr.__version__, "numpy": np.__version__,
            "cpus": os.cpu_count()}
    if DEV.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gb"] = torch.cuda.get_device_properties(0).total_memory / 1e9
    try:
        torchseis_models()
        info["torchseis"] = "ok"
    except Exception as e:  # noqa: BLE001
        info["torchseis"] = f"{type(e).__name__}: {e}"
    emit("env", **info)


def step_gpu_model(a):
    """Models as GPU users hold them (on the GPU, float32 and half): does volarray take them? Where it
    refuses, the later steps give it CPU copies (cpu_copies.txt in --out says so)."""
    from volarray.models import InstanceNormUNet, seeded
    n = 64
    x = volume(n, seed=7)
    refused = []
    for name, make, kw in (("FaultSeg3d float32", lambda: faultseg().to(DEV), {}),
                           ("FaultSeg3d half", lambda: faultseg().to(DEV).half(), {}),
                           ("InstanceNormUNet float32", lambda: seeded(InstanceNormUNet).to(DEV), {})):
        if "half" in name and not DEV.startswith("cuda"):
            continue  # half-precision convolutions crawl on CPUs
        m = make()
        xin = x.astype(np.float16) if "half" in name else x
        try:
            y = np.asarray(volarray.predict(m, xin, device=DEV, **kw).compute(scheduler="threads"))
            emit("gpu_model", model=name, ok=True, shape=list(y.shape))
        except Exception as e:  # noqa: BLE001
            refused.append(name)
            emit("gpu_model", model=name, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    if refused and DEV.startswith("cuda"):
        with open(os.path.join(a.out, "cpu_copies.txt"), "w") as f:
            f.write("volarray refused models on the GPU: " + ", ".join(refused) + "\n")


def step_exact256(a):
    """fp32, TF32 off: volarray on the GPU equals torch's own whole-volume forward."""
    n = S[256]
    m = faultseg().to(DEV)
    x = volume(n)
    plain(m, volume(32))  # warm-up: cuDNN and the allocator
    ref = measure("exact256", "torch", lambda: plain(m, x), n=n)
    line, ps = plan_line(m.cpu(), x)
    emit("exact256", plan=line, plan_s=round(ps, 2), n=n, note="default memory_limit")
    measure("exact256", "volarray default", lambda: va(m, x), ref, n=n)
    measure("exact256", "volarray default, again", lambda: va(m, x), ref, n=n)
    measure("exact256", "volarray 16GB x2 workers",
            lambda: va(m, x, memory_limit="16GB", num_workers=2), ref, n=n)
    line, ps = plan_line(m, x, memory_limit="16GB")
    emit("exact256", plan=line, plan_s=round(ps, 2), n=n, note="memory_limit 16GB")


def step_fp16_512(a):
    """Half precision as torchseis runs it (model.half()), rank 0 and its rank 3, against
    volarray's autocast; errors against an fp32 forward of the same weights."""
    n = S[512]
    m = faultseg().to(DEV)
    x = volume(n, seed=1)
    plain(m, volume(32))
    ref = measure("fp16_512", "torchseis fp32 rank3 (reference)", lambda: plain(m, x, rank=3), n=n)
    mh = on_cpu_too(faultseg().to(DEV).half())
    if DEV.startswith("cuda"):
        plain(mh, volume(64), half=True)
        plain(mh, volume(64), half=True, rank=3)
    if DEV.startswith("cuda"):
        measure("fp16_512", "torch fp16 rank0", lambda: plain(mh, x, half=True), ref, n=n)
    if DEV.startswith("cuda"):
        measure("fp16_512", "torchseis fp16 rank3", lambda: plain(mh, x, half=True, rank=3), ref, n=n)
    measure("fp16_512", "volarray fp16 default (first call: trace and plan)",
            lambda: va(m, x, compute_dtype=HALF), ref, n=n)
    measure("fp16_512", "volarray fp16 default (warm)",
            lambda: va(m, x, compute_dtype=HALF), ref, n=n)
    measure("fp16_512", "volarray fp16 16GB x2",
            lambda: va(m, x, compute_dtype=HALF, memory_limit="16GB", num_workers=2), ref, n=n)
    if DEV.startswith("cuda"):
        measure("fp16_512", "volarray half model", lambda: va(mh, x.astype(np.float16)), ref, n=n)


def step_big1024(a):
    """The seed's headline: 1024^3 FaultSeg3D in half precision on one GPU."""
    n = S[1024]
    x = volume(n, seed=2)
    mh = on_cpu_too(faultseg().to(DEV).half())
    m = faultseg().to(DEV)
    ts = None
    if DEV.startswith("cuda"):
        plain(mh, volume(64), half=True, rank=3)
        ts = measure("big1024", "torchseis fp16 rank3", lambda: plain(mh, x, half=True, rank=3), n=n)
    line, ps = plan_line(m, x, memory_limit="16GB")
    emit("big1024", plan=line, plan_s=round(ps, 2), n=n)
    measure("big1024", "volarray fp16 16GB x2",
            lambda: va(m, x, compute_dtype=HALF, memory_limit="16GB", num_workers=2), ts, n=n)
    measure("big1024", "volarray fp16 default", lambda: va(m, x, compute_dtype=HALF), ts, n=n)


def step_fp32_512(a):
    """fp32 at 512^3 with torch's defaults (cuDNN may use TF32): plain against volarray."""
    torch.backends.cudnn.allow_tf32 = True
    n = S[512]
    m = faultseg().to(DEV)
    x = volume(n, seed=3)
    plain(m, volume(32))
    ref = measure("fp32_512", "torchseis fp32 tf32 rank3", lambda: plain(m, x, rank=3), n=n)
    measure("fp32_512", "volarray fp32 tf32 16GB x2",
            lambda: va(m, x, memory_limit="16GB", num_workers=2), ref, n=n)


def step_norms(a):
    """Whole-volume normalization statistics on the GPU: exact against torch."""
    from volarray.models import GroupNormNet, InstanceNormUNet, seeded
    n = S[256] // 2
    x = volume(n, seed=4)
    for cls in (InstanceNormUNet, GroupNormNet):
        m = on_cpu_too(seeded(cls).to(DEV))
        t = torch.from_numpy(x)[None, None].to(DEV)
        with torch.inference_mode():
            ref = m(t)[0].cpu().numpy()
        measure("norms", f"volarray {cls.__name__}", lambda: va(m, x), ref, n=n)


def step_cluster(a):
    """A dask LocalCluster worker with a GPU resource, as the README's dask-cuda recipe."""
    from distributed import Client, LocalCluster
    n = S[256]
    m = faultseg().to(DEV)
    x = volume(n, seed=5)
    ref = plain(m, x)
    res = {"GPU": 1} if DEV.startswith("cuda") else {}
    with LocalCluster(n_workers=1, threads_per_worker=2, resources=res, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        measure("cluster", "volarray LocalCluster 1 GPU worker (cold)",
                lambda: va(m, x, scheduler=client), ref, n=n)
        measure("cluster", "volarray LocalCluster 1 GPU worker (warm)",
                lambda: va(m, x, scheduler=client), ref, n=n)
        emit("cluster", worker_cuda=client.run(lambda: __import__("torch").cuda.is_available()),
             worker_peak_gpu_gb=client.run(lambda: __import__("torch").cuda.max_memory_allocated() / 1e9))


def step_zarr512(a):
    """Out of core: zarr in, zarr out, through predict_to_zarr on the GPU."""
    import tempfile

    import zarr
    n = S[512]
    m = faultseg()
    d = tempfile.mkdtemp()
    x = volume(n, seed=6)
    z = zarr.create_array(os.path.join(d, "in.zarr"), shape=x.shape, chunks=(128, 128, 128),
                          dtype="float32")
    z[:] = x
    emit("zarr512", note="input written", n=n)
    measure("zarr512", "predict_to_zarr fp16",
            lambda: volarray.predict_to_zarr(m, z, os.path.join(d, "out.zarr"), device=DEV,
                                             compute_dtype=HALF), n=n)


if __name__ == "__main__":
    main()
