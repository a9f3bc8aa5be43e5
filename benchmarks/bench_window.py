"""Window mode beside MONAI's sliding_window_inference: same window, overlap and
gaussian weights; time, peak RSS and the difference between the two.

    python benchmarks/bench_window.py [--sizes 128 192] [--window 96] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench_exact import measure
from volarray.synthetic import seismic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--roi-size", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="FaultSeg3D")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            vol, ref = Path(tmp, f"v{n}.npy"), Path(tmp, f"monai{n}.npy")
            np.save(vol, seismic((n,) * 3, seed=1)[0])
            runs = {"monai": [], "volarray": []}
            for r in range(a.repeats):
                runs["monai"].append(measure("monai", a.model, n, vol, [
                    "--warmup", "--roi-size", str(a.roi_size)] + (["--save", str(ref)] if r == 0 else [])))
                runs["volarray"].append(measure("volarray", a.model, n, vol, [
                    "--warmup", "--method", "window", "--roi-size", str(a.roi_size), "--compare",
                    str(ref)]))
            med = {e: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "peak_rss")}
                   for e, rs in runs.items()}
            rows.append((n, med, max(x["max_abs_diff"] for x in runs["volarray"])))
    print(f"\n{a.model}, window {a.roi_size}, overlap 0.25, gaussian, threaded scheduler, median of "
          f"{a.repeats}, one process per run\n")
    print("| volume | MONAI s | volarray window s | MONAI peak RSS | volarray peak RSS | "
          "max abs diff |")
    print("|---|---|---|---|---|---|")
    for n, med, diff in rows:
        m, v = med["monai"], med["volarray"]
        print(f"| {n}^3 | {m['seconds']:.2f} | {v['seconds']:.2f} | {m['peak_rss'] / 1e9:.2f} GB "
              f"| {v['peak_rss'] / 1e9:.2f} GB | {diff:.1e} |")


if __name__ == "__main__":
    main()
