"""One measured run in its own process, so that peak RSS is that run's alone.

    python benchmarks/_runner.py torch|volarray|monai MODEL SIZE [--volume V.npy|V.zarr]
        [--out OUT.zarr] [--chunks N] [--scheduler S] [--warmup] [--save REF.npy]
        [--compare REF.npy] [--crop N] [--memory-limit 1GB] [--path to_zarr]

Prints one JSON line: seconds, peak RSS (bytes) and, with --compare, the max
abs difference from a saved reference. With --out, volarray runs zarr to zarr
(`predict_to_zarr`) and nothing of the volume is loaded whole.

Plain torch and MONAI run as they do without volarray: with torch's default allocator,
not the huge pages importing volarray asks for (`volarray/heap.py`); --huge-pages gives
them huge pages too. Each result says whether torch's tensors were on huge pages.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

if len(sys.argv) > 1 and sys.argv[1] in ("torch", "monai"):  # before volarray's import
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if "--huge-pages" in sys.argv else "0"

import numpy as np
import torch

import volarray
from volarray import models
from volarray.heap import huge_pages_requested
from volarray.synthetic import seismic


def chunk_arg(text: str):
    sides = tuple(int(c) for c in text.split(","))
    return sides[0] if len(sides) == 1 else sides


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def load(a):
    if a.volume and a.volume.endswith(".zarr"):
        import zarr
        z = zarr.open_array(a.volume, mode="r")
        if a.engine == "volarray" and a.out:
            return a.volume  # read lazily, chunk by chunk
        return z[:a.crop, :a.crop, :a.crop] if a.crop else z[...]
    if a.volume:
        return np.load(a.volume)  # made by the parent, so that its generation is not counted
    return seismic((a.size,) * 3, seed=1)[0]


def run(a, model, vol):
    if a.engine == "torch":
        with torch.inference_mode():
            return model(torch.from_numpy(vol)[None, None])[0].numpy()
    if a.engine == "monai":
        from monai.inferers import sliding_window_inference
        with torch.inference_mode():
            return sliding_window_inference(torch.from_numpy(vol)[None, None], a.roi_size, 1, model,
                                            overlap=0.25, mode="gaussian")[0].numpy()
    if a.out and a.path == "to_zarr":  # the README's first example: a lazy result, stored
        import zarr
        y = volarray.predict(model, zarr.open_array(vol, mode="r"), chunks=a.chunks,
                             memory_limit=a.memory_limit, keep=a.keep)
        y.to_zarr(a.out, overwrite=True, compute=True)
        return zarr.open_array(a.out, mode="r")
    if a.out:
        return volarray.predict_to_zarr(model, vol, a.out, chunks=a.chunks, overwrite=True,
                                        memory_limit=a.memory_limit, scheduler=a.scheduler,
                                        keep=a.keep)
    t0 = time.perf_counter()
    extra = {"method": "window", "roi_size": a.roi_size} if a.method == "window" else \
        {"keep": a.keep}
    y = volarray.predict(model, vol, chunks=a.chunks, memory_limit=a.memory_limit, **extra)
    a.build_seconds = time.perf_counter() - t0
    return y.compute(scheduler=a.scheduler)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["torch", "volarray", "monai"])
    ap.add_argument("model")
    ap.add_argument("size", type=int)
    ap.add_argument("--chunks", type=chunk_arg, default=None, help="N or Z,Y,X")
    ap.add_argument("--keep", default=None, help="volarray exact: keep budget ('0', '2x', '1GB')")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--memory-limit", default=None)
    ap.add_argument("--volume", help=".npy or .zarr of the input volume")
    ap.add_argument("--out", help="volarray: write this zarr store (zarr to zarr)")
    ap.add_argument("--path", default="predict_to_zarr", choices=["predict_to_zarr", "to_zarr"],
                    help="with --out: volarray.predict_to_zarr, or predict(...).to_zarr")
    ap.add_argument("--crop", type=int, help="torch/monai: run on the corner crop of this side")
    ap.add_argument("--roi-size", type=int, default=96, help="monai / window mode: window side")
    ap.add_argument("--method", default="exact", choices=["exact", "window"], help="volarray mode")
    ap.add_argument("--warmup", action="store_true", help="one small run first")
    ap.add_argument("--huge-pages", action="store_true",
                    help="torch / monai: on huge pages, as volarray asks for")
    ap.add_argument("--save")
    ap.add_argument("--compare")
    a = ap.parse_args(argv)
    model = models.seeded(getattr(models, a.model))
    vol = load(a)
    if a.warmup:  # both engines: first-call costs (oneDNN kernels, torch's lazy imports)
        small = seismic((48, 48, 48), seed=2)[0]
        run(argparse.Namespace(**{**vars(a), "out": None, "roi_size": 32}), model, small)
        a.build_seconds = 0.0
    base = peak_rss()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = run(a, model, vol)
    seconds = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    rss = peak_rss()
    res = {"engine": a.engine, "model": a.model, "size": a.size, "seconds": seconds,
           # CPU seconds in user code and in the kernel (faulting pages in, I/O)
           "user_s": cpu.ru_utime - cpu0.ru_utime, "kernel_s": cpu.ru_stime - cpu0.ru_stime,
           "minor_faults": cpu.ru_minflt - cpu0.ru_minflt,
           "huge_pages": huge_pages_requested(),
           "build_seconds": getattr(a, "build_seconds", 0.0), "peak_rss": rss,
           "baseline_rss": base}
    if a.engine == "volarray":
        if a.method == "exact":
            res["plan_peak"] = volarray.plan(model, vol if not isinstance(vol, str) else
                                             volarray.io.open_volume(vol), chunks=a.chunks,
                                             memory_limit=a.memory_limit, keep=a.keep).peak_bytes
    if a.save:
        np.save(a.save, out)
    if a.compare:
        res["max_abs_diff"] = float(np.abs(np.asarray(out[...]) - np.load(a.compare)).max())
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
