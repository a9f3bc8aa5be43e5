"""Keep-or-recompute at survey size under three storage budgets (issue 27's table).

    python benchmarks/bench_keep_budgets.py [--side 4096] [--models FaultSeg3D ...]

Plans `predict_to_zarr` would make (nothing is computed: a lazy volume, fake tensors) at
rates ``macs=2e10,bytes=1e9,task=0.0002`` (this 2-core CPU's order of magnitude):
keep="1x", and the default budget (half the free disk where scratch lives) on a disk
with 2 TB free and with 83 GB free. Prints a markdown table: kept bytes, compute
against one forward, tasks, projected hours, and the plan's one-line note on a slow
plan, if any; and each plan's time to capture and plan.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VOLARRAY_RATES", "macs=2e10,bytes=1e9,task=0.0002")

import volarray.keep  # noqa: E402
from volarray import models  # noqa: E402
from volarray.planner import format_bytes, make_plan  # noqa: E402
from volarray.trace import trace  # noqa: E402


def cell(plan, seconds: float) -> str:
    note = f" ({plan.shortfall.text(plan.compute_ratio)})" if plan.shortfall else ""
    return (f"{format_bytes(plan.kept_bytes)}, {plan.compute_ratio:.2f}x, {plan.n_tasks:,}, "
            f"{plan.projected_seconds / 3600:.1f} h{note} [{seconds:.1f} s]")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--models", nargs="+", default=["FaultSeg3D", "InstanceNormUNet",
                                                    "GroupNormNet"])
    a = ap.parse_args()
    print(f'| model, {a.side}^3 | keep="1x" | 2 TB free | 83 GB free |')
    print("|---|---|---|---|")
    for name in a.models:
        graph = trace(models.seeded(getattr(models, name)), (1, 1) + (a.side,) * 3)
        cells = []
        for keep, free in (("1x", 2e12), (None, 2e12), (None, 83e9)):
            volarray.keep.free_disk = lambda where=None, free=free: int(free)
            t0 = time.perf_counter()
            plan = make_plan(graph, None, None, "cpu", keep=keep, spill=True)
            cells.append(cell(plan, time.perf_counter() - t0))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
