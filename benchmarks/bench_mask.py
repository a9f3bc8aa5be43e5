"""mask=: a synthetic irregular survey whose footprint leaves ~40% of the (inline,
crossline) plane dead, predicted with and without its mask; time, tasks skipped, and
the result inside (bitwise) and outside (the fill) the mask.

    python benchmarks/bench_mask.py [--size 256] [--chunks 64] [--repeats 1]
        [--model FaultSeg3D] [--dead 0.4]

Prints a markdown table (benchmarks/results/mask.md holds the measured one).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import volarray
from volarray import models
from volarray.synthetic import seismic


def staircase(n: int, dead: float = 0.4, seed: int = 0) -> np.ndarray:
    """Live traces of an (n, n) survey shot in eight swaths of inlines, each ending at
    its own crossline (a staircase outline, as surveys acquired patch by patch are),
    every line's end ragged by a few traces; ``dead`` of the plane has no trace."""
    rng = np.random.default_rng(seed)
    x = np.arange(n)[None, :]
    steps = np.array([1.0, 1.0, 0.9, 0.75, 0.6, 0.45, 0.35, 0.3])  # live extent per swath
    ragged = rng.integers(-3, 4, n)
    lo, hi = 0.0, 2.0
    for _ in range(40):  # the power of the steps that leaves ``dead`` of the plane dead
        s = (lo + hi) / 2
        end = np.repeat(steps ** s, -(-n // len(steps)))[:n] * n
        live = x < (end + ragged * (end < n))[:, None]
        lo, hi = (s, hi) if live.mean() > 1 - dead else (lo, s)
    return live


def lobed(n: int, dead: float = 0.4) -> np.ndarray:
    """Live traces inside an irregular lobed outline around the centre, its radius
    chosen so that ``dead`` of the plane lies outside (dead corners and bays)."""
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    angle, radius = np.arctan2(y, x), np.hypot(y, x)
    shape = 1 + 0.18 * np.sin(3 * angle + 0.4) + 0.08 * np.cos(7 * angle)
    lo, hi = 0.0, float(n)
    for _ in range(40):
        r = (lo + hi) / 2
        lo, hi = (r, hi) if (radius > r * shape).mean() > dead else (lo, r)
    return radius <= hi * shape


def timed(fn):
    """Wall and CPU seconds of ``fn()`` (CPU time of this process, all its threads: the
    fairer figure on a machine shared with other work), and its value."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def measure(model, vol, live, chunks, repeats):
    """Best-of-``repeats`` seconds unmasked and masked, the plan, and the checks."""
    mask = np.broadcast_to(live, vol.shape)  # (sample, inline, crossline)
    vol = np.where(mask, vol, 0).astype(np.float32)  # dead traces: zeros
    p = volarray.plan(model, vol, chunks=chunks, mask=mask)
    runs = {"unmasked": [], "masked": []}
    for _ in range(repeats):
        t0, full = timed(lambda: volarray.predict(model, vol, chunks=chunks,
                                                  mask=None).compute())
        t1, got = timed(lambda: volarray.predict(model, vol, chunks=chunks,
                                                 mask=mask).compute())
        runs["unmasked"].append(t0)
        runs["masked"].append(t1)
    checks = (np.array_equal(got[:, mask], full[:, mask]), bool((got[:, ~mask] == 0).all()))
    return {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in runs.items()}, p, checks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--chunks", default="256,32,32", help="N or Z,Y,X")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model", default="FaultSeg3D")
    ap.add_argument("--dead", type=float, default=0.4)
    ap.add_argument("--outlines", nargs="+", default=["staircase", "lobed"])
    a = ap.parse_args()
    chunks = tuple(int(c) for c in a.chunks.split(","))
    chunks = chunks[0] if len(chunks) == 1 else chunks
    model = models.seeded(getattr(models, a.model))
    n = a.size
    vol = seismic((n,) * 3, seed=1)[0]
    print(f"{a.model}, {n}^3 fp32, chunks {chunks}, {os.cpu_count()} CPU cores "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}; "
          f"best of {a.repeats}\n")
    print("| outline | dead traces | unmasked s (wall / CPU) | masked s (wall / CPU) | "
          "masked / unmasked (wall / CPU) | tile tasks skipped | bitwise inside | "
          "fill outside |")
    print("|---|---|---|---|---|---|---|---|")
    for outline in a.outlines:
        live = {"staircase": staircase, "lobed": lobed}[outline](n, a.dead)
        best, p, (inside, outside) = measure(model, vol, live, chunks, a.repeats)
        (w0, c0), (w1, c1) = best["unmasked"], best["masked"]
        print(f"| {outline} | {1 - live.mean():.1%} | {w0:.1f} / {c0:.1f} | {w1:.1f} / "
              f"{c1:.1f} | {w1 / w0:.2f}x / {c1 / c0:.2f}x | {p.skipped_tasks} of "
              f"{p.n_tasks} | {inside} | {outside} |", flush=True)
        print(f"<!-- {outline}: {p.notes[-1]} -->", flush=True)


if __name__ == "__main__":
    main()
