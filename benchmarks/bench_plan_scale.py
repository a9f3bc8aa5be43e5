"""The planning table: what exact mode would keep, compute and schedule at survey sizes.

Plans every reference model on lazy volumes of 1024^3 to 8192^3 (nothing is computed or
allocated: the volume is a lazy dask array and the capture runs on fake tensors), at the
default keep budget (the input's bytes, as `predict_to_zarr` uses), at zero keep and at
2x and 4x the input, and prints a markdown table: bytes kept between stages (and that
over the input's bytes), compute against one whole-volume forward, tasks (stage tasks
plus statistics tasks), the projected peak per task, and the time to capture and plan.
With --build N, also builds the dask graph up to N^3 and times that.

    python benchmarks/bench_plan_scale.py [--sizes 1024 2048 4096 8192] [--build 4096]
"""
from __future__ import annotations

import argparse
import time

import dask.array as da
import torch

from volarray import models
from volarray.planner import format_bytes, make_plan
from volarray.trace import trace

MODELS = ["FaultSeg3D", "MultiScaleNet", "InstanceNormUNet", "GroupNormNet",
          "DeepLabV3Plus3D", "SEResUNet"]
KEEPS = ("default", "0", "2x", "4x")


def lazy_volume(side: int):
    return da.zeros((1, side, side, side), dtype="float32", chunks=(1, 512, 512, 512))


def row(name, graph, side, keep, build_max, traced):
    t0 = time.perf_counter()
    plan = make_plan(graph, None, None, "cpu", keep=None if keep == "default" else keep,
                     spill=True)
    planned = time.perf_counter() - t0 + traced
    built = ""
    if side <= build_max:
        from volarray.execute import build_graph
        from volarray.geometry import chunk_bounds
        from volarray.io import rechunk_to
        t0 = time.perf_counter()
        arr = lazy_volume(side)
        arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], plan.chunks)])
        y = build_graph(plan, arr, "cpu")
        n_keys = len(y.__dask_graph__())
        built = f"{time.perf_counter() - t0:.0f} s ({n_keys:,} keys)"
    input_bytes = 4 * side ** 3
    return (f"| {name} | {side}^3 | {keep} | {format_bytes(plan.kept_bytes)} "
            f"({plan.kept_bytes / input_bytes:.2f}x) | {plan.compute_ratio:.2f}x | "
            f"{plan.n_tasks:,} | {format_bytes(plan.peak_bytes)} | {planned:.1f} s | {built} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--keeps", nargs="+", default=list(KEEPS))
    ap.add_argument("--build", type=int, default=0, help="build the graph up to this side")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | volume | keep | kept between stages (x input) | compute vs one forward "
          "| tasks | peak/task | capture + plan | graph build |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = models.seeded(getattr(models, name))
        for side in args.sizes:
            t0 = time.perf_counter()
            graph = trace(model, (1, 1, side, side, side))
            traced = time.perf_counter() - t0
            for keep in args.keeps:
                print(row(name, graph, side, keep, args.build, traced), flush=True)
                traced = 0.0


if __name__ == "__main__":
    main()
