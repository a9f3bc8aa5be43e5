"""Max abs error against the whole-volume forward, for every reference model.

    python benchmarks/bench_accuracy.py

Exact mode on non-cubic volumes with chunks that do not divide them, beside
MONAI's sliding_window_inference (gaussian, overlap 0.25) on the same volume, to
show what patch-based inference changes. Prints a markdown table.
"""
from __future__ import annotations

import numpy as np
import torch

import volarray
from volarray import models
from volarray.synthetic import seismic

CASES = [  # model, volume shape, chunks, MONAI window
    ("FaultSeg3D", (64, 96, 80), (40, 36, 48), 48),
    ("MultiScaleNet", (45, 70, 53), (24, 30, 20), 32),
    ("InstanceNormUNet", (48, 72, 60), (28, 40, 36), 32),
    ("GroupNormNet", (45, 70, 53), (24, 30, 20), 32),
    ("DeepLabV3Plus3D", (45, 70, 53), (24, 30, 20), 32),
    ("SEResUNet", (44, 68, 52), (24, 30, 20), 32),
]


def main():
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        sliding_window_inference = None
    print("| model | volume | chunks | volarray max abs diff | same, input * 50 + 300 | "
          "MONAI window (gaussian, 0.25) max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, shape, chunks, window in CASES:
        model = models.seeded(getattr(models, name))
        vol = seismic(shape, seed=4)[0]
        row = [name, "x".join(map(str, shape)), "x".join(map(str, chunks))]
        refs = []
        for v in (vol, vol * 50 + 300):
            x = torch.from_numpy(np.ascontiguousarray(v))[None, None]
            with torch.inference_mode():
                ref = model(x)[0].numpy()
            out = volarray.predict(model, v, chunks=chunks).compute()
            row.append(f"{np.abs(out - ref).max():.1e}")
            refs.append((x, ref))
        if sliding_window_inference is not None:
            x, ref = refs[0]
            with torch.inference_mode():
                mon = sliding_window_inference(x, window, 1, model, overlap=0.25,
                                               mode="gaussian")[0].numpy()
            row.append(f"{np.abs(mon - ref).max():.1e}")
        else:
            row.append("(monai not installed)")
        print("| " + " | ".join(row) + " |")
    print("\nReduced precision (dtype=, tiles under torch.autocast) against the fp32 whole-volume "
          "forward, FaultSeg3D 64x96x80, unit-scale synthetic seismic, sigmoid output:\n")
    print("| dtype | max abs diff | mean abs diff |")
    print("|---|---|---|")
    model = models.seeded(models.FaultSeg3D)
    vol = seismic((64, 96, 80), seed=4)[0]
    with torch.inference_mode():
        ref = model(torch.from_numpy(vol)[None, None])[0].numpy()
    for dtype in ("float32", "bfloat16", "float16"):
        out = volarray.predict(model, vol, chunks=(40, 36, 48), dtype=dtype).compute()
        print(f"| {dtype} | {np.abs(out - ref).max():.1e} | {np.abs(out - ref).mean():.1e} |")


if __name__ == "__main__":
    main()
