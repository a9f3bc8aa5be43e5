"""The plan's projected memory agrees with what a run measures."""
import json
import subprocess
import sys

SCRIPT = """
import json, resource
import numpy as np
import volarray
from volarray.models import FaultSeg3D, seeded

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

model = seeded(FaultSeg3D)
vol = np.random.default_rng(0).standard_normal((96, 96, 96)).astype(np.float32)
volarray.predict(model, vol[:24, :24, :24], chunks=24).compute(scheduler="sync")  # warm up
plan = volarray.plan(model, vol, chunks=96)
y = volarray.predict(model, vol, chunks=96)
base = rss()
out = y.compute(scheduler="sync")
print(json.dumps({"grown": rss() - base, "peak": plan.peak_bytes, "kept": plan.kept_bytes,
                  "out": out.nbytes}))
"""


def test_measured_peak_agrees_with_projection():
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    # one task at a time (sync): the largest task's tensors, plus what stays between stages
    projected = m["peak"] + m["kept"] + m["out"]
    assert 0.6 * projected <= m["grown"] <= 1.4 * projected, m
