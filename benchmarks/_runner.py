"""One measured run in its own process, so that peak RSS is that run's alone.

    python benchmarks/_runner.py torch|volarray MODEL SIZE [--chunks N] [--scheduler S]
        [--save REF.npy] [--compare REF.npy] [--memory-limit 1GB]

Prints one JSON line: seconds, peak RSS (bytes) and, with --compare, the max
abs difference from a saved reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

import volarray
from volarray import models
from volarray.synthetic import seismic


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def run(a, model, vol):
    if a.engine == "torch":
        with torch.inference_mode():
            return model(torch.from_numpy(vol)[None, None])[0].numpy()
    y = volarray.predict(model, vol, chunks=a.chunks, memory_limit=a.memory_limit)
    return y.compute(scheduler=a.scheduler)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["torch", "volarray"])
    ap.add_argument("model")
    ap.add_argument("size", type=int)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--memory-limit", default=None)
    ap.add_argument("--volume", help=".npy of the input volume")
    ap.add_argument("--warmup", action="store_true", help="one small run first")
    ap.add_argument("--save")
    ap.add_argument("--compare")
    a = ap.parse_args(argv)
    model = models.seeded(getattr(models, a.model))
    if a.volume:
        vol = np.load(a.volume)  # made by the parent, so that its generation is not counted
    else:
        vol, _ = seismic((a.size,) * 3, seed=1)
    if a.warmup:  # both engines: first-call costs (oneDNN kernels, torch's lazy imports)
        small = np.ascontiguousarray(vol[:48, :48, :48])
        run(a, model, small)
    base = peak_rss()
    t0 = time.perf_counter()
    if a.engine == "torch":
        with torch.inference_mode():
            out = model(torch.from_numpy(vol)[None, None])[0].numpy()
        build = 0.0
    else:
        y = volarray.predict(model, vol, chunks=a.chunks, memory_limit=a.memory_limit)
        build = time.perf_counter() - t0
        out = y.compute(scheduler=a.scheduler)
    seconds = time.perf_counter() - t0
    rss = peak_rss()
    res = {"engine": a.engine, "model": a.model, "size": a.size, "seconds": seconds,
           "build_seconds": build, "peak_rss": rss, "baseline_rss": base}
    if a.engine == "volarray":
        res["plan_peak"] = volarray.plan(model, vol, chunks=a.chunks,
                                         memory_limit=a.memory_limit).peak_bytes
    if a.save:
        np.save(a.save, out)
    if a.compare:
        res["max_abs_diff"] = float(np.abs(out - np.load(a.compare)).max())
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
