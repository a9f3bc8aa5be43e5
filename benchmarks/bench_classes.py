"""Peak memory of output="argmax" with a 1000-class head against a 10-class head on the
same body, each in its own process, and labels against the whole-volume argmax.

    python benchmarks/bench_classes.py [--size 96]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import numpy as np, torch
import volarray
from volarray.models import MultiScaleNet, seeded
from volarray.synthetic import seismic
classes, n = int(sys.argv[1]), int(sys.argv[2])
model = seeded(MultiScaleNet, classes=classes)
vol = seismic((n, n, n), seed=1)[0]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
labels = volarray.predict(model, vol, output="argmax").compute()
res = {"classes": classes, "seconds": time.perf_counter() - t0, "base": base,
       "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "chunks": volarray.plan(model, vol, output="argmax").chunks, "dtype": str(labels.dtype)}
if len(sys.argv) > 3:  # check against the whole-volume argmax (costs memory: after the peak)
    with torch.inference_mode():
        ref = model(torch.from_numpy(vol)[None, None])[0].argmax(0).numpy()
    res["label_agreement"] = float((labels == ref).mean())
print(json.dumps(res))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=96)
    a = ap.parse_args()
    rows = []
    for classes in (10, 1000):
        out = subprocess.run([sys.executable, "-c", CHILD, str(classes), str(a.size), "check"],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\nMultiScaleNet body, output='argmax', {a.size}^3, threaded scheduler\n")
    print("| classes | chunks | seconds | peak RSS GB | labels equal to whole-volume argmax |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['classes']} | {tuple(r['chunks'])} | {r['seconds']:.1f} | "
              f"{r['peak'] / 1e9:.2f} | {r['label_agreement']:.6f} |")
    print(f"\npeak RSS, 1000 classes / 10 classes: {rows[1]['peak'] / rows[0]['peak']:.2f}")


if __name__ == "__main__":
    main()
