"""Exact mode against plain torch: time and peak RSS, side by side, medians.

    python benchmarks/bench_exact.py [--sizes 128 192] [--repeats 3] [--model FaultSeg3D]

Each measurement runs in its own process (benchmarks/_runner.py) so that peak
RSS belongs to that run alone; the input volume is made once and loaded from
.npy. Engines alternate within each repeat. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from volarray.synthetic import seismic

HERE = Path(__file__).parent


def measure(engine, model, size, vol_path, extra=()):
    cmd = [sys.executable, str(HERE / "_runner.py"), engine, model, str(size),
           "--volume", str(vol_path), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="FaultSeg3D")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--cold", action="store_true", help="no warm-up run in each process")
    a = ap.parse_args(argv)
    common = [] if a.cold else ["--warmup"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            vol_path, ref_path = Path(tmp, f"vol{size}.npy"), Path(tmp, f"ref{size}.npy")
            np.save(vol_path, seismic((size,) * 3, seed=1)[0])
            va_args = common + ["--scheduler", a.scheduler, "--compare", str(ref_path)]
            if a.chunks:
                va_args += ["--chunks", str(a.chunks)]
            runs = {"torch": [], "volarray": []}
            for r in range(a.repeats):
                runs["torch"].append(measure("torch", a.model, size, vol_path,
                                             common + (["--save", str(ref_path)] if r == 0 else [])))
                runs["volarray"].append(measure("volarray", a.model, size, vol_path, va_args))
            med = {e: {k: statistics.median(x.get(k, 0.0) for x in rs) for k in
                       ("seconds", "build_seconds", "peak_rss")} for e, rs in runs.items()}
            diff = max(x["max_abs_diff"] for x in runs["volarray"])
            plan_peak = runs["volarray"][0]["plan_peak"]
            rows.append((size, med, diff, plan_peak))
    print(f"\n{a.model}, fp32, {a.scheduler} scheduler, median of {a.repeats} "
          f"({'cold' if a.cold else 'after a 48^3 warm-up'}) runs, one process per run\n")
    print("| volume | torch s | volarray s (build) | time ratio | torch peak RSS | "
          "volarray peak RSS | RSS ratio | plan peak/task | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, med, diff, plan_peak in rows:
        t, v = med["torch"], med["volarray"]
        print(f"| {size}^3 | {t['seconds']:.2f} | {v['seconds']:.2f} ({v['build_seconds']:.2f}) | "
              f"{v['seconds'] / t['seconds']:.2f}x | {t['peak_rss'] / 1e9:.2f} GB | "
              f"{v['peak_rss'] / 1e9:.2f} GB | {v['peak_rss'] / t['peak_rss']:.0%} | "
              f"{plan_peak / 1e6:.0f} MB | {diff:.1e} |")


if __name__ == "__main__":
    main()
