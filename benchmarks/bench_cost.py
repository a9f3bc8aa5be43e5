"""Projected against measured time: the plan volarray chooses, run, beside its cost
model's projection (issue 27).

    python benchmarks/bench_cost.py [--models FaultSeg3D InstanceNormUNet GroupNormNet]
        [--sizes 128 256] [--issue-case] [--out benchmarks/results/cost.md]

Per model and size: the plan `predict_to_zarr` runs from a zarr survey (default
budgets: scratch within half the free disk), its projected time in its three parts at
this machine's rates (`volarray.rates.rates_for`: the cached calibration, or
VOLARRAY_RATES), and the measured time of that run in its own process
(`_runner.py`, after a 48^3 warm-up, with VOLARRAY_HEAP from ``--heap``; the time
includes tracing and planning the volume's shape, which this process times apart on a
fresh model, and the ratio leaves out). ``--issue-case``: FaultSeg3D 160^3 with memory_limit=60MB against the
default memory limit, both through `predict_to_zarr`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench_scale import measure  # each run in its own process, through _runner.py

HERE = Path(__file__).parent


def projected(model_name: str, n: int, memory_limit=None):
    """The plan, and the seconds its capture and planning took here (a fresh model
    object: nothing cached), which the measured run pays too."""
    import time

    import volarray
    from volarray import models
    model = models.seeded(getattr(models, model_name))
    t0 = time.perf_counter()
    plan = volarray.plan(model, np.zeros((n,) * 3, np.float32), scratch=True,
                         memory_limit=memory_limit)
    return plan, time.perf_counter() - t0


def row(model_name, n, tmp: Path, memory_limit=None) -> str:
    from volarray.synthetic import seismic_to_zarr
    vol = tmp / f"in{n}.zarr"
    if not vol.exists():
        seismic_to_zarr(vol, (n,) * 3, seed=1)
    plan, plan_s = projected(model_name, n, memory_limit)
    args = ["--volume", vol, "--out", tmp / f"out-{model_name}-{n}.zarr", "--warmup"]
    if memory_limit:
        args += ["--memory-limit", memory_limit]
    m = measure("volarray", model_name, n, *args)
    t = plan.projection
    got = f"{m['seconds']:.1f}" if "seconds" in m else m.get("error", "failed")[:40]
    run_s = m["seconds"] - plan_s if "seconds" in m else None
    # a run shorter than its plan's cold capture (a warm process reuses it): no ratio
    ratio = f"{t.seconds / run_s:.2f}" if run_s and run_s > 0 else "-"
    print(model_name, n, memory_limit, repr(plan), t, m, file=sys.stderr, flush=True)
    cpu = f"{m['user_s']:.1f} / {m['kernel_s']:.1f}" if "kernel_s" in m else "-"
    peak = f"{m['peak_rss'] / 1e9:.2f}" if "peak_rss" in m else "-"
    faults = f"{m['minor_faults'] / 1e6:.2f}" if "minor_faults" in m else "-"
    return (f"| {model_name} | {n}^3 | {memory_limit or 'default'} | {plan.n_tasks} | "
            f"{plan.compute_ratio:.2f}x | {plan.kept_bytes / 1e6:.0f} MB | {t.compute_s:.1f} | "
            f"{t.memory_s:.1f} | {t.io_s:.2f} | {t.overhead_s:.3f} | {t.seconds:.1f} | {got} | "
            f"{plan_s:.1f} | {ratio} | {cpu} | {faults} | {peak} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+",
                    default=["FaultSeg3D", "InstanceNormUNet", "GroupNormNet"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--issue-case", action="store_true")
    ap.add_argument("--heap", choices=["return", "reuse"],
                    help="VOLARRAY_HEAP for the measured runs (default: as set, else 'return')")
    ap.add_argument("--out", default=str(HERE / "results" / "cost.md"))
    a = ap.parse_args(argv)
    if a.heap:  # the runs' processes inherit it
        os.environ["VOLARRAY_HEAP"] = a.heap
    from volarray.heap import heap_policy
    from volarray.rates import rates_for
    rates = rates_for("cpu")
    lines = [f"Rates: {rates.text()}. `predict_to_zarr` from a zarr survey, one process per "
             "run after a 48^3 warm-up; measured includes tracing and planning, which "
             "`capture + plan s` times apart (the same plan made cold in this process); "
             "`projected / run` is projected / (measured - capture + plan); `user / kernel "
             f"CPU s` is the run's CPU time (VOLARRAY_HEAP={heap_policy()}); `page faults M`: the "
             "pages the run's process faulted in, millions (4 kB each, or 2 MB on huge pages).",
             "",
             "| model | volume | memory limit | tasks | compute | kept | projected compute s "
             "| memory-bound s | I/O s | overhead s | projected s | measured s | "
             "capture + plan s | projected / run | user / kernel CPU s | page faults M | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        for name in a.models:
            for n in a.sizes:
                lines.append(row(name, n, Path(tmp)))
        if a.issue_case:
            for limit in (None, "60MB"):
                lines.append(row("FaultSeg3D", 160, Path(tmp), limit))
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
