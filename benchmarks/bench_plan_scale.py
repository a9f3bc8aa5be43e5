"""The planning table: what exact mode would keep, compute and schedule at survey sizes.

Plans each reference model on lazy volumes of 1024^3 to 8192^3 (nothing is computed or
allocated: the volume is a lazy dask array and the capture runs on fake tensors), at the
default budget and at zero keep, and prints a markdown table: bytes kept between stages
(and that over the input's bytes), compute against one whole-volume forward, tasks
(stage tiles plus statistics tiles), and the time to capture and plan. With --build N,
also builds the dask graph up to N^3 and times that.

    python benchmarks/bench_plan_scale.py [--sizes 1024 2048 4096 8192] [--build 1024]
"""
from __future__ import annotations

import argparse
import time

import dask.array as da
import torch

from volarray.models import FaultSeg3D, seeded
from volarray.plan import _fmt_bytes
from volarray.models.norms import GroupNormNet, InstanceNormUNet

MODELS = {
    "FaultSeg3D": lambda: seeded(FaultSeg3D),
    "InstanceNormUNet": lambda: seeded(InstanceNormUNet),
    "GroupNormNet": lambda: seeded(GroupNormNet),
}


def lazy_volume(side: int):
    return da.zeros((1, side, side, side), dtype="float32", chunks=(1, 512, 512, 512))


def row(name, model, side, keep, build_max):
    t0 = time.perf_counter()
    kw = {} if keep == "default" else {"keep_threshold": 0.0}
    plan = _plan(model, lazy_volume(side), **kw)
    planned = time.perf_counter() - t0
    built = ""
    if side <= build_max:
        from volarray.api import _build
        t0 = time.perf_counter()
        y = _build(plan, lazy_volume(side), "cpu", None, 0, None, None)
        n_keys = len(y.__dask_graph__())
        built = f"{time.perf_counter() - t0:.1f} s ({n_keys:,} keys)"
    input_bytes = 4 * side ** 3
    return (f"| {name} | {side}^3 | {keep} | {_fmt_bytes(plan.kept_bytes)} "
            f"({plan.kept_bytes / input_bytes:.2f}x) | {plan.compute_ratio:.2f}x | "
            f"{plan.n_tasks:,} | {planned:.1f} s | {built} |")


def _plan(model, arr, keep_threshold=None):
    """The default plan, or one whose keep threshold is lowered to zero (only tensors
    that fit the budget, and the output, are kept)."""
    from volarray.plan import make_plan
    from volarray.trace import trace
    graph = trace(model, (1,) + tuple(arr.shape))
    if keep_threshold is None:
        return make_plan(graph, None, None, "cpu")
    return make_plan(graph, None, None, "cpu", keep_threshold=keep_threshold)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--build", type=int, default=0, help="build the graph up to this side")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | volume | keep | kept between stages (x input) | compute vs one forward "
          "| tasks | capture + plan | graph build |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = MODELS[name]()
        for side in args.sizes:
            for keep in ("default", "zero"):
                print(row(name, model, side, keep, args.build), flush=True)


if __name__ == "__main__":
    main()
