"""1 against 2 single-threaded dask workers (LocalCluster processes) on one volume:
speedup, and where the time goes (compute, transfer of halos and kept tensors
between workers, the rest: scheduling and idle).

    python benchmarks/bench_scaling.py [--size 256] [--model FaultSeg3D]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from distributed import Client, LocalCluster

import volarray
from volarray import models
from volarray.synthetic import seismic


def run(n_workers, model, vol):
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        y = volarray.predict(model, vol)
        client.run(lambda: __import__("torch").set_num_threads(1))
        client.get_task_stream()  # start recording
        t0 = time.perf_counter()
        with volarray_task_stream(client) as ts:
            out = client.compute(y).result()
        wall = time.perf_counter() - t0
        spent = {}
        for task in ts.data:
            for ss in task["startstops"]:
                spent[ss["action"]] = spent.get(ss["action"], 0.0) + ss["stop"] - ss["start"]
    return out, wall, spent


class volarray_task_stream:
    def __init__(self, client):
        from distributed import get_task_stream
        self.cm = get_task_stream(client)

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default="FaultSeg3D")
    a = ap.parse_args()
    model = models.seeded(getattr(models, a.model))
    vol = seismic((a.size,) * 3, seed=1)[0]
    rows = []
    for n in (1, 2):
        out, wall, spent = run(n, model, vol)
        rows.append((n, wall, spent, out))
    assert np.array_equal(rows[0][3], rows[1][3]) or np.abs(rows[0][3] - rows[1][3]).max() < 1e-5
    print(f"\n{a.model} exact mode at {a.size}^3 on a LocalCluster of single-threaded worker "
          "processes (torch threads = 1 per worker)\n")
    print("| workers | wall s | speedup | compute s (all workers) | transfer s | "
          "other (scheduling, idle) s |")
    print("|---|---|---|---|---|---|")
    for n, wall, spent, _ in rows:
        compute, transfer = spent.get("compute", 0.0), spent.get("transfer", 0.0)
        print(f"| {n} | {wall:.1f} | {rows[0][1] / wall:.2f}x | {compute:.1f} | {transfer:.1f} | "
              f"{max(n * wall - compute - transfer, 0):.1f} |")


if __name__ == "__main__":
    main()
