"""Time against volume size at every 32 voxels from 96^3 to 320^3, volarray beside plain
torch, so that no size between two measured ones hides a cliff (a swept task whose
buffers cost more than its convolutions ran 2.4x torch's time at 192^3, between the
128^3 and 256^3 that were measured).

    python benchmarks/bench_sweep_sizes.py [--sizes 96 128 160] [--model FaultSeg3D]
        [--repeats 1] [--out benchmarks/results/sweep_sizes.md]

Per size, side by side, each run in its own process (`_runner.py`, after a 48^3
warm-up): plain torch in memory, volarray's in-memory path (the README's
`volarray.predict(model, x).compute()`, threaded scheduler) and `predict_to_zarr` from a
zarr survey. On a shared or loaded machine absolute times are noisy: the table gives
each volarray time as a ratio to the torch run measured beside it (medians over
``--repeats``), with the plan each path ran (tasks, slab rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr

from bench_scale import measure  # each engine in its own process, through _runner.py

HERE = Path(__file__).parent
SIZES = list(range(96, 321, 32))
ENGINES = ("torch", "memory", "to_zarr")


def plan_line(model_name, size) -> str:
    """The plan both volarray paths run at this size (default budgets), in a few words."""
    import volarray
    from volarray import models
    model = models.seeded(getattr(models, model_name))
    plan = volarray.plan(model, np.zeros((size,) * 3, np.float32))
    slabs = ",".join(str(s.slab or "-") for s in plan.stages)
    return f"{plan.n_tasks} tasks, slab {slabs}, {plan.compute_ratio:.2f}x compute"


def run_size(a, tmp: Path, n: int) -> dict:
    from volarray.synthetic import seismic_to_zarr
    vol = tmp / f"in{n}.zarr"
    seismic_to_zarr(vol, (n,) * 3, seed=1)
    npy = tmp / f"in{n}.npy"
    np.save(npy, zarr.open_array(str(vol), mode="r")[...])
    runs = {e: [] for e in ENGINES}
    for _ in range(a.repeats):  # engines interleaved: each ratio from runs side by side
        runs["torch"].append(measure("torch", a.model, n, "--volume", npy, "--warmup"))
        runs["memory"].append(measure("volarray", a.model, n, "--volume", npy, "--warmup"))
        runs["to_zarr"].append(measure("volarray", a.model, n, "--volume", vol, "--out",
                                       tmp / f"out{n}.zarr", "--warmup"))
    row = {"size": n, "plan": plan_line(a.model, n)}
    for e, ms in runs.items():
        ok = [m for m in ms if "seconds" in m]
        if not ok:
            row[e] = {"error": ms[-1].get("error", "failed")}
            continue
        row[e] = {"seconds": statistics.median(m["seconds"] for m in ok),
                  "peak_rss": statistics.median(m["peak_rss"] for m in ok),
                  "build": statistics.median(m.get("build_seconds", 0.0) for m in ok)}
    return row


def table(rows, a) -> str:
    def cell(r, e, key, scale=1.0):
        m = r.get(e, {})
        return f"{m[key] / scale:.2f}" if key in m else m.get("error", "-")[:40]

    def ratio(r, e):
        m, t = r.get(e, {}), r.get("torch", {})
        return f"{m['seconds'] / t['seconds']:.2f}x" if "seconds" in m and "seconds" in t \
            else "-"
    lines = [f"{a.model}, fp32, one process per run after a 48^3 warm-up, median of "
             f"{a.repeats}; volarray at its default plan (memory limit, keep).", "",
             "| volume | torch s | in-memory s | ratio | of which building s | predict_to_zarr s "
             "| ratio | torch GB | in-memory GB | to_zarr GB | plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']}^3 | {cell(r, 'torch', 'seconds')} | {cell(r, 'memory', 'seconds')} "
            f"| {ratio(r, 'memory')} | {cell(r, 'memory', 'build')} "
            f"| {cell(r, 'to_zarr', 'seconds')} | {ratio(r, 'to_zarr')} "
            f"| {cell(r, 'torch', 'peak_rss', 1e9)} | {cell(r, 'memory', 'peak_rss', 1e9)} "
            f"| {cell(r, 'to_zarr', 'peak_rss', 1e9)} | {r['plan']} |")
    lines += ["", "ratio: volarray's time over plain torch's, measured side by side; building: "
              "the in-memory path's `predict` call (capture, probe check, plan), within its "
              "time; GB: peak RSS of the run's process."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="FaultSeg3D")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "sweep_sizes.md"))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        for n in a.sizes:
            rows.append(run_size(a, Path(tmp), n))
            print(json.dumps(rows[-1]), file=sys.stderr)
    text = table(rows, a)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text("# Time against volume size, every 32 voxels\n\n" + text + "\n")


if __name__ == "__main__":
    main()
