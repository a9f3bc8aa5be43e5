#!/usr/bin/env python3
"""Where volarray's GPU time goes: each case timed on the threaded scheduler, then once on the
sync scheduler under cProfile (Python hot spots) and once under torch.profiler (device kernels).
Each case in its own process under a timeout; text tables land in $OUT.
Dry run on a CPU: python benchmarks/profile_gpu.py --device cpu --small --out /tmp/p
"""
from __future__ import annotations

# torchseis is imported from a copy outside the project (never vendored): its package
# folder's parent on PYTHONPATH, or in TORCHSEIS_PATH
import os as _os
import sys as _sys

if _os.environ.get("TORCHSEIS_PATH"):
    _sys.path.insert(0, _os.environ["TORCHSEIS_PATH"])

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

CASES = {"fp16_512_default": 85, "fp32_512_16gb": 80, "instnorm_128": 45, "cluster_warm": 55}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--deadline", type=float, default=250)
    ap.add_argument("--case")
    a = ap.parse_args()
    if a.case:
        return run_case(a)
    t0 = time.time()
    for case, limit in CASES.items():
        left = a.deadline - (time.time() - t0)
        if left < 20:
            print(f"== {case}: skipped", flush=True)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--out", a.out,
               "--device", a.device] + (["--small"] if a.small else [])
        ts = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(limit, left - 5))
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout"
        print(out, flush=True)
        if rc != 0:
            print("\n".join(err.splitlines()[-15:]), flush=True)
        print(f"== {case} done in {time.time() - ts:.1f} s rc={rc}", flush=True)


def run_case(a):
    import numpy as np
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    import volarray
    cuda = a.device.startswith("cuda")
    n512, n256, n128 = (512, 256, 128) if not a.small else (48, 40, 24)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def vol(n, seed=0):
        g = torch.Generator(device=a.device).manual_seed(seed)
        return torch.randn((n, n, n), generator=g, device=a.device).cpu().numpy()

    def faultseg():
        from bench_gpu import torchseis_models  # beside this script; the triton stand-in
        M = torchseis_models()
        torch.manual_seed(0)
        return M.FaultSeg3d().eval()

    def profiled(name, fn):
        """fn(scheduler) -> dask array; time threaded twice, sync once, cProfile, torch.profiler."""
        r = {"case": name}
        for label, sch in (("threads", "threads"), ("sync", "sync")):
            sync()
            t = time.perf_counter()
            np.asarray(fn().compute(scheduler=sch))
            sync()
            r[label + "_s"] = round(time.perf_counter() - t, 3)
        print("RESULT " + json.dumps(r), flush=True)
        pr = cProfile.Profile()
        pr.enable()
        np.asarray(fn().compute(scheduler="sync"))
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        s2 = io.StringIO()
        pstats.Stats(pr, stream=s2).sort_stats("cumulative").print_stats(30)
        with open(os.path.join(a.out, f"{name}.cprofile.txt"), "w") as f:
            f.write(s.getvalue()[-12000:] + "\n\n==== cumulative\n" + s2.getvalue()[-12000:])
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            np.asarray(fn().compute(scheduler="sync"))
            sync()
        key = "device_time_total" if cuda else "cpu_time_total"
        with open(os.path.join(a.out, f"{name}.torchprof.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=30))
            f.write("\n\n==== by self cpu time\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(f"wrote {name} profiles", flush=True)

    if a.case == "fp16_512_default":
        m = faultseg()
        x = vol(n512, 1)
        print("PLAN " + repr(volarray.plan(m, x, device=a.device)), flush=True)
        half = "float16" if cuda else None
        profiled(a.case, lambda: volarray.predict(m, x, device=a.device, compute_dtype=half))
    elif a.case == "fp32_512_16gb":
        torch.backends.cudnn.allow_tf32 = True
        m = faultseg()
        x = vol(n512, 3)
        print("PLAN " + repr(volarray.plan(m, x, device=a.device, memory_limit="16GB")), flush=True)
        profiled(a.case, lambda: volarray.predict(m, x, device=a.device, memory_limit="16GB"))
    elif a.case == "instnorm_128":
        from volarray.models import InstanceNormUNet, seeded
        m = seeded(InstanceNormUNet)
        x = vol(n128, 4)
        print("PLAN " + repr(volarray.plan(m, x, device=a.device)), flush=True)
        profiled(a.case, lambda: volarray.predict(m, x, device=a.device))
    elif a.case == "cluster_warm":
        from distributed import Client, LocalCluster
        m = faultseg()
        x = vol(n256, 5)
        res = {"GPU": 1} if cuda else {}
        with LocalCluster(n_workers=1, threads_per_worker=2, resources=res, processes=True,
                          dashboard_address=None) as cl, Client(cl) as client:
            for label in ("cold", "warm", "warm2"):
                t = time.perf_counter()
                np.asarray(volarray.predict(m, x, device=a.device).compute(scheduler=client))
                print("RESULT " + json.dumps({"case": a.case, label + "_s":
                                              round(time.perf_counter() - t, 3)}), flush=True)
            t = time.perf_counter()
            np.asarray(volarray.predict(m, x, device=a.device, memory_limit="16GB").compute(scheduler=client))
            print("RESULT " + json.dumps({"case": a.case, "warm_16gb_s":
                                          round(time.perf_counter() - t, 3)}), flush=True)
        t = time.perf_counter()
        np.asarray(volarray.predict(m, x, device=a.device).compute(scheduler="threads"))
        print("RESULT " + json.dumps({"case": a.case, "local_threads_s":
                                      round(time.perf_counter() - t, 3)}), flush=True)


if __name__ == "__main__":
    main()
