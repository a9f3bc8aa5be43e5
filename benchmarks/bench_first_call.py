"""The first call in a fresh process: import, trace + self-check + plan, and graph build.

Each measurement runs in its own fresh Python process (nothing imported, nothing kept):
``import volarray`` (and torch, dask), then FaultSeg3D (random weights, eval()) is built,
then timed from the call on:

- first plan: ``volarray.plan(model, x)`` on a lazy dask volume of zeros (tracing,
  the probe check and planning; the phases' seconds come from the
  ``volarray.progress`` logger's DEBUG lines),
- second plan: the same call again (a new predictor: the trace is kept in the process),
- first predict: in another fresh process, ``volarray.predict(model, x)`` up to the
  lazy dask array (trace, check, plan and the dask graph; nothing computed).

Wall seconds (and the process' CPU seconds, which a busy shared machine inflates less)
are the median of ``--repeats`` processes. Prints a markdown table.

    python benchmarks/bench_first_call.py [--sizes 256 512 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, logging, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import volarray, dask.array as da
from volarray.models.faultseg import FaultSeg3D
imported = (time.perf_counter() - t0, time.process_time() - c0)
phases = {}
class Phases(logging.Handler):
    def emit(self, record):
        words = record.getMessage().split()
        if len(words) == 4 and words[1] == "took":
            phases[words[0]] = phases.get(words[0], 0.0) + float(words[2])
log = logging.getLogger("volarray.progress")
log.addHandler(Phases()); log.setLevel(logging.DEBUG)
n, what = int(sys.argv[1]), sys.argv[2]
model = FaultSeg3D().eval()
x = da.zeros((1, n, n, n), chunks=(1, 256, 256, 256), dtype="float32")
def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c
out = {"import": imported}
if what == "plan":
    out["first plan"] = timed(lambda: volarray.plan(model, x))
    out["phases"] = dict(phases)
    out["second plan"] = timed(lambda: volarray.plan(model, x))
else:
    out["first predict"] = timed(lambda: volarray.predict(model, x))
out["dynamo"] = "torch._dynamo" in sys.modules
print(json.dumps(out))
"""


def fresh(n: int, what: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, str(n), what], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.splitlines()[-1])


def median(runs, key, i=0):
    return statistics.median(r[key][i] for r in runs)


def measure(n: int, repeats: int) -> dict:
    plans = [fresh(n, "plan") for _ in range(repeats)]
    predicts = [fresh(n, "predict") for _ in range(repeats)]
    row = {k: (median(plans, k), median(plans, k, 1))
           for k in ("import", "first plan", "second plan")}
    row["first predict"] = (median(predicts, "first predict"),
                            median(predicts, "first predict", 1))
    for p in ("tracing", "checking", "planning"):
        row[p] = statistics.median(r["phases"].get(p, 0.0) for r in plans)
    row["dynamo"] = any(r["dynamo"] for r in plans + predicts)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print("| FaultSeg3D | import volarray | first plan | tracing (of it) | checking "
          "(of tracing) | planning | second plan | first predict (graph) | torch._dynamo "
          "imported |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        r = measure(n, args.repeats)

        def both(k):
            return f"{r[k][0]:.2f} s ({r[k][1]:.2f} s CPU)"
        print(f"| {n}^3 | {both('import')} | {both('first plan')} | {r['tracing']:.2f} s | "
              f"{r['checking']:.2f} s | {r['planning']:.2f} s | {both('second plan')} | "
              f"{both('first predict')} | {'yes' if r['dynamo'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
