"""Out of core against in memory: `predict_to_zarr` from a zarr input to a zarr output
beside `volarray.predict(model, numpy_volume).compute()` for the same volume.

    python benchmarks/bench_out_of_core.py [--sizes 128 256] [--repeat 3]

FaultSeg3D (seeded weights, eval()), default options, threaded scheduler, both paths
side by side in one process after a 48^3 warm-up of each; the median of ``--repeat``
runs. CPU seconds (the process's, all threads) are printed beside the wall time: on a
shared machine they tell the work done apart from the waiting. Peak RSS is sampled during each run (the process's resident set, so it includes
what earlier runs left allocated). Checks that both outputs are bitwise equal. Prints
a markdown table: size, in-memory s, zarr-to-zarr s, ratio, peak RSS of each.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import dask
import numpy as np
import psutil
import torch
import zarr

import volarray
from volarray.models.faultseg import FaultSeg3D
from volarray.synthetic import seismic_to_zarr

HERE = Path(__file__).parent


class PeakRSS:
    """The process's peak resident set while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(fn):
    """(wall s, CPU s of the process, peak RSS, result)."""
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, rss.peak, result


def run_size(model, n: int, repeat: int, tmp: Path) -> dict:
    vol = tmp / f"in{n}.zarr"
    seismic_to_zarr(vol, (n,) * 3, seed=1)
    numpy_volume = zarr.open_array(str(vol), mode="r")[...]
    mem, z2z = [], []
    for r in range(repeat):
        *m, y = timed(lambda: volarray.predict(model, numpy_volume).compute())
        mem.append(m)
        out = tmp / f"out{n}-{r}.zarr"
        *z, _ = timed(lambda: volarray.predict_to_zarr(model, str(vol), str(out)))
        z2z.append(z)
        if r == 0:
            written = zarr.open_group(str(out), mode="r")["prediction"][...]
            if not np.array_equal(written, y):
                raise SystemExit(f"{n}^3: zarr-to-zarr differs from in memory by "
                                 f"{np.abs(written - y).max()}")
        print(f"  {n}^3 run {r}: in memory {mem[-1][0]:.2f} s, zarr to zarr {z2z[-1][0]:.2f} s",
              flush=True)
    t_mem = statistics.median(s for s, _, _ in mem)
    t_z2z = statistics.median(s for s, _, _ in z2z)
    return {"size": n, "mem": t_mem, "z2z": t_z2z, "ratio": t_z2z / t_mem,
            "cpu_mem": statistics.median(c for _, c, _ in mem),
            "cpu_z2z": statistics.median(c for _, c, _ in z2z),
            "rss_mem": max(p for _, _, p in mem), "rss_z2z": max(p for _, _, p in z2z)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    dask.config.set(scheduler="threads")
    torch.manual_seed(0)
    model = FaultSeg3D().eval()
    rows = []
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        tmp = Path(tmp)
        warm = tmp / "warm.zarr"
        seismic_to_zarr(warm, (48,) * 3, seed=1)
        volarray.predict(model, zarr.open_array(str(warm), mode="r")[...]).compute()
        volarray.predict_to_zarr(model, str(warm), str(tmp / "warm-out.zarr"))
        for n in a.sizes:
            rows.append(run_size(model, n, a.repeat, tmp))
    gb = 2 ** 30
    print(f"\nFaultSeg3D, median of {a.repeat}, threaded scheduler, {psutil.cpu_count()} cores\n")
    print("| size | in-memory s | zarr-to-zarr s | ratio | CPU s in memory | CPU s "
          "zarr-to-zarr | CPU ratio | peak RSS in memory | peak RSS zarr-to-zarr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}^3 | {r['mem']:.2f} | {r['z2z']:.2f} | {r['ratio']:.2f} | "
              f"{r['cpu_mem']:.1f} | {r['cpu_z2z']:.1f} | {r['cpu_z2z'] / r['cpu_mem']:.2f} | "
              f"{r['rss_mem'] / gb:.2f} GB | {r['rss_z2z'] / gb:.2f} GB |")


if __name__ == "__main__":
    main()
