"""Time and peak memory against volume size: volarray zarr to zarr on both paths (the
README's `predict(...).to_zarr` on the threaded scheduler, and `predict_to_zarr`),
beside plain torch and MONAI's sliding_window_inference as far as they fit.

    python benchmarks/bench_scale.py [--sizes 128 192 256 384 512] [--torch-max 256]
        [--monai-max 256] [--paths to_zarr predict_to_zarr] [--plot benchmarks/results/scale.png]

Every run is its own process after a 48^3 warm-up (peak RSS is that run's alone).
Inputs are zarr surveys written block by block. At the largest size, the output is
checked against plain torch on the 256^3 corner crop, away from the crop's inner
faces. Prints a markdown table (seconds, peak RSS, time per voxel, and each against
256^3) and draws a PNG.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr

from volarray.synthetic import seismic_to_zarr

HERE = Path(__file__).parent


def measure(engine, model, size, *args):
    cmd = [sys.executable, str(HERE / "_runner.py"), engine, model, str(size), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="FaultSeg3D")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256, 384, 512])
    ap.add_argument("--torch-max", type=int, default=256)
    ap.add_argument("--monai-max", type=int, default=256)
    ap.add_argument("--crop", type=int, default=256, help="correctness crop at the largest size")
    ap.add_argument("--paths", nargs="+", default=["to_zarr", "predict_to_zarr"],
                    choices=["to_zarr", "predict_to_zarr"])
    ap.add_argument("--plot", default=str(HERE / "results" / "scale.png"))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        for n in a.sizes:
            vol = Path(tmp, f"in{n}.zarr")
            seismic_to_zarr(vol, (n,) * 3, seed=1)
            row = {"size": n}
            for path in a.paths:
                row[path] = measure("volarray", a.model, n, "--volume", vol, "--out",
                                    Path(tmp, f"out{n}-{path}.zarr"), "--path", path, "--warmup")
            if n <= a.torch_max:
                row["torch"] = measure("torch", a.model, n, "--volume", vol, "--warmup")
            if n <= a.monai_max:
                row["monai"] = measure("monai", a.model, n, "--volume", vol, "--warmup")
            if n == max(a.sizes) and n >= a.crop:
                ref = Path(tmp, "crop.npy")
                measure("torch", a.model, a.crop, "--volume", vol, "--crop", a.crop, "--save", ref)
                inner = a.crop - 64  # away from the crop's inner faces (halo < 64)
                got = zarr.open_array(str(Path(tmp, f"out{n}-{a.paths[0]}.zarr")), mode="r") \
                    if a.paths[0] == "to_zarr" else \
                    zarr.open_group(str(Path(tmp, f"out{n}-{a.paths[0]}.zarr")))["prediction"]
                diff = np.abs(got[:, :inner, :inner, :inner] -
                              np.load(ref)[:, :inner, :inner, :inner]).max()
                row["crop_diff"] = float(diff)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    def cell(r, key, field, scale=1.0, fmt="{:.2f}"):
        m = r.get(key)
        if m is None:
            return "-"
        if "error" in m:
            return "failed"
        return fmt.format(m[field] / scale)

    print(f"\n{a.model}, fp32, zarr to zarr (volarray, threaded scheduler) against in-memory "
          "plain torch and MONAI (window 96, overlap 0.25, gaussian), one process per run\n")
    engines = list(a.paths) + ["torch", "monai"]
    print("| volume | " + " | ".join(f"{e} s | {e} peak RSS GB" for e in engines) + " |")
    print("|---|" + "---|---|" * len(engines))
    for r in rows:
        print(f"| {r['size']}^3 | " + " | ".join(
            f"{cell(r, e, 'seconds')} | {cell(r, e, 'peak_rss', 1e9)}" for e in engines) + " |")
    for r in rows:
        if "crop_diff" in r:
            print(f"\nat {r['size']}^3: max |volarray - torch on the {a.crop}^3 corner crop| over "
                  f"its {a.crop - 64}^3 corner (64 voxels from the crop's inner faces): "
                  f"{r['crop_diff']:.1e}")
    base = next((r for r in rows if r["size"] == 256), None)
    for path in a.paths:
        for r in rows:
            m, b = r.get(path, {}), (base or {}).get(path, {})
            if r is base or "seconds" not in m or "seconds" not in b:
                continue
            voxels = (r["size"] / 256) ** 3
            print(f"{path} at {r['size']}^3 against 256^3 ({voxels:g}x the voxels): time "
                  f"{m['seconds'] / b['seconds']:.2f}x, time per voxel "
                  f"{m['seconds'] / b['seconds'] / voxels:.2f}x, peak RSS "
                  f"{m['peak_rss'] / b['peak_rss']:.2f}x")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("to_zarr", "volarray predict(...).to_zarr"),
                       ("predict_to_zarr", "volarray predict_to_zarr"), ("torch", "plain torch"),
                       ("monai", "MONAI sliding window")):
        pts = [(r["size"], r[key]["peak_rss"] / 1e9) for r in rows
               if key in r and "peak_rss" in r[key]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("volume side (voxels, cube)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title(f"{a.model}: peak memory against volume size")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"plot: {Path(a.plot).name}")  # no machine paths in the results


if __name__ == "__main__":
    main()
