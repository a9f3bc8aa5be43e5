"""SIMULATION, not a measurement of inference: volarray's real graph for a big volume
(every task and dependency as planned, 4096^3 by default) run on a dask LocalCluster, one
task slot (thread) per GPU, each task's work replaced by a sleep and a small payload.

What it tells: how dask's scheduler copes with the graph (tasks per second), the
critical path, how long the normalization barriers hold workers idle, and the wall
time projected on 8, 64 and 512 GPUs; where the scheduler, not compute, is the limit.

How a task's time is modelled:

- plans: for GPUs of ``--gpu-memory`` GB (80 by default: an H100's), as volarray plans
  on such a device (its per-task budget from the device's free memory, two tasks in
  flight, the 'whole' strategy, float16 compute); the device is faked for the planner
  (torch.cuda's memory query answers ``--gpu-memory``), nothing runs on it. 0: plans for
  this CPU, as before;
- compute: the task's MACs (its stage's MACs, halos and recomputation included, shared
  by the volume of its output region) over a rate: ``--gpu-rate`` TMAC/s per GPU, by
  default 47, measured on one H200 on 2026-12-04 (FaultSeg3D 512^3 float16: 1.27 x 8.75
  TMAC in 0.236 s of convolution kernels, bias included; 21.6 TMAC/s in float32 with
  TF32), or ``--rate cpu`` for the rate measured here on this CPU;
- I/O: the bytes the task reads (its sources' regions, halo included) and writes (its
  output region) over ``--bandwidth`` GB/s per worker, as from a parallel file system or
  object store (predict_to_zarr's tasks read the input and kept tensors from storage
  and write there);
- payload: a task returns its output's bytes divided by ``--payload-scale`` (the real
  payload, hundreds of terabytes, would not fit this machine); dask moves those bytes
  between workers as it would move the real ones;
- time: sleeps are multiplied by a time scale (1 unless the run would take longer than
  ``--budget`` seconds; the table states it), and walls are divided by it back. A time
  scale below 1 overstates the scheduler's share (its overhead is not scaled), so such
  projections are upper bounds.

Every worker lives in this one process (LocalCluster(processes=False)), one worker per
node of ``--gpus-per-node`` GPUs (8), one thread per GPU: 512 GPUs are 64 workers of 8
threads (512 single-thread workers' event loops do not run on two cores). The scheduler
shares this machine's two cores and its GIL with every worker's event loop, so the
scheduler throughput here is a floor for a scheduler on a node of its own; "limit" says
scheduler where the simulated wall is over 1.5x the compute-bound one.

    python benchmarks/bench_simulate.py [--size 4096] [--models FaultSeg3D InstanceNormUNet]
        [--gpus 8 64 512] [--gpu-rate 20] [--bandwidth 2] [--payload-scale 10000]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections import defaultdict
from graphlib import TopologicalSorter

import numpy as np
import torch
import zarr
from dask.core import get_dependencies, istask
from distributed import Client, LocalCluster, get_task_stream

from unittest import mock

import volarray
from volarray import models
from volarray.worker import (combine_task, eval_task, run_task, statistics_of, stats_task,
                             value_task)

FLOAT_BYTES = 4


def lazy_volume(size: int) -> zarr.Array:
    """A (size,)^3 float32 zarr array in memory with no chunk written: metadata only, so
    tasks read it straight from the array (the graph of a zarr input) and nothing is
    allocated."""
    return zarr.create_array(store=zarr.storage.MemoryStore(), shape=(size,) * 3,
                             chunks=(256,) * 3, dtype="float32")


def box_voxels(lo, hi) -> int:
    return math.prod(int(b) - int(a) for a, b in zip(lo, hi))


class TaskCost:
    """MACs and bytes of each task of volarray's graph, from the plan it was built from."""

    def __init__(self, plan):
        self.plan = plan
        self.out_channels = {s.index: plan.graph.nodes[s.output].channels for s in plan.stages}

    @staticmethod
    def domain(bounds) -> int:
        return math.prod(int(b[-1]) - int(b[0]) for b in bounds)

    def of(self, task, key=None) -> tuple[float, int, int, str]:
        """(MACs, bytes read, bytes written, kind) of one task of the graph (``key``:
        its key, which names the barrier whose statistics a stage's task computed)."""
        fn = task[0]
        if fn is statistics_of:  # ('volarray-stats-<i>-<token>', 0, i, j, k)
            return 0.0, 0, 0, f"statistics {self.plan.barriers[int(key[0].split('-')[2])].name}"
        if fn in (run_task, stats_task):
            spec = task[2]
            index, (lo, hi) = spec.index, spec.bounds
            boxes = [b for _, b, _ in spec.reads]
            channels = [self.plan.graph.nodes[s.node].channels for s, _, _ in spec.reads]
            part = self.plan.stages[index] if fn is run_task else self.plan.barriers[index]
            macs = part.macs * box_voxels(lo, hi) / self.domain(part.bounds)
            read = sum(box_voxels(*b) * c for b, c in zip(boxes, channels)) * FLOAT_BYTES
            if fn is run_task:
                return macs, read, box_voxels(lo, hi) * self.out_channels[index] * FLOAT_BYTES, \
                    f"stage {index}"
            return macs, read, 0, f"statistics {part.name}"
        if fn is value_task:
            return 0.0, 0, 0, f"value {task[2]}"
        if fn in (combine_task, eval_task):
            return 0.0, 0, 0, "combine"
        return 0.0, 0, 0, "other"


def simulated(dsk: dict, cost: TaskCost, rate: float, bandwidth: float):
    """The graph with each task replaced by ``(sleep_task, seconds, payload bytes, *deps)``,
    and each task's modelled seconds and kind."""
    seconds, kinds, writes, deps = {}, {}, {}, {}
    for key, task in dsk.items():
        macs, read, write, kind = cost.of(task, key) if istask(task) else (0.0, 0, 0, "other")
        seconds[key] = macs / rate + (read + write) / bandwidth
        kinds[key], writes[key] = kind, write
        deps[key] = sorted(get_dependencies(dsk, key), key=str)
    return seconds, kinds, writes, deps


class SleepTask:
    """A task's stand-in: sleeps its modelled seconds, returns its payload's bytes. A
    callable object with its own token: dask tokenizes every task of a submitted graph,
    and a plain function of a module loaded by path is tokenized by pickling it, once
    per task (minutes for 50,000 tasks)."""

    def __call__(self, seconds, payload, *deps):
        time.sleep(seconds)
        return bytes(payload)

    def __dask_tokenize__(self):
        return "volarray-simulation-sleep"


sleep_task = SleepTask()


def critical_path(seconds: dict, deps: dict) -> float:
    finish = {}
    for key in TopologicalSorter(deps).static_order():
        finish[key] = seconds[key] + max((finish[d] for d in deps[key]), default=0.0)
    return max(finish.values())


def run_simulation(gpus: int, seconds, writes, deps, scale: float, payload_scale: float,
                   per_node: int = 8):
    """Run the sleep graph on ``gpus`` task slots, ``per_node`` threads per worker (one
    dask worker per node of ``per_node`` GPUs); the wall (seconds) and the task stream."""
    graph = {k: (sleep_task, seconds[k] * scale, int(writes[k] / payload_scale)) + tuple(deps[k])
             for k in seconds}
    needed = set().union(*deps.values())
    sinks = [k for k in graph if k not in needed]
    # memory_limit=0: in-process workers all see this one process's RSS, and with a limit
    # each would pause itself once that passed its share
    per_node = min(per_node, gpus)
    with LocalCluster(n_workers=gpus // per_node, threads_per_worker=per_node, processes=False,
                      memory_limit=0, dashboard_address=":0", silence_logs=50) as cluster, \
            Client(cluster) as client:
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            futures = client.get(graph, sinks, sync=False)
            client.gather(futures)
            wall = time.perf_counter() - t0
        stream = ts.data
    return wall, stream


def utilization(stream, kinds, workers: int) -> tuple[float, float]:
    """(busy fraction of the workers over the run, worker-seconds idle while barriers
    wait: from a barrier's last statistics tile to its value, the time no worker spent
    on any task)."""
    spans = [(ss["start"], ss["stop"], kinds.get(rec["key"], "other"))
             for rec in stream for ss in rec["startstops"] if ss["action"] == "compute"]
    if not spans:
        return 0.0, 0.0
    t0, t1 = min(s for s, _, _ in spans), max(e for _, e, _ in spans)
    busy = sum(e - s for s, e, _ in spans) / ((t1 - t0) * workers)
    tiles_end, value_end = defaultdict(float), {}
    for s, e, k in spans:
        if k.startswith("statistics "):
            tiles_end[k[11:]] = max(tiles_end[k[11:]], e)
        elif k.startswith("value "):
            value_end[k[6:]] = e
    idle = 0.0
    for name, lo in tiles_end.items():
        hi = value_end.get(name, lo)
        worked = sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in spans)
        idle += (hi - lo) * workers - worked
    return busy, idle


def cpu_rate(model) -> float:
    """MACs per second of plain ``model(volume)`` on this CPU (all its threads), 96^3."""
    x = torch.randn(1, 1, 96, 96, 96)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
        dt = time.perf_counter() - t0
    p = volarray.plan(model, np.zeros((96,) * 3, np.float32))
    return p.model_macs / dt


@contextlib.contextmanager
def planned_gpu(gb: float):
    """torch.cuda as the planner sees one GPU of ``gb`` GB (half a GB taken by the CUDA
    context); nothing can run on it."""
    if not gb:
        yield "cpu"
        return
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "device_count", lambda: 1), \
            mock.patch.object(torch.cuda, "mem_get_info",
                              lambda device=None: (gb * 1e9 - 0.5e9, gb * 1e9)):
        yield "cuda"


def plan_and_graph(model, vol, keep: str, gpu_memory: float):
    """The plan and the lazy result, for GPUs of ``gpu_memory`` GB (0: this CPU)."""
    with planned_gpu(gpu_memory) as device:
        half = "float16" if device == "cuda" else None
        p = volarray.plan(model, vol, keep=keep, device=device, compute_dtype=half)
        y = volarray.predict(model, vol, keep=keep, device=device, compute_dtype=half)
    return p, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--models", nargs="+", default=["FaultSeg3D", "InstanceNormUNet"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--gpu-rate", type=float, default=47.0,
                    help="TMAC/s of one GPU on 3D convolutions (47: H200, float16, measured)")
    ap.add_argument("--gpu-memory", type=float, default=80.0,
                    help="GB of each GPU the plans are made for (0: plan for this CPU)")
    ap.add_argument("--rate", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--bandwidth", type=float, default=2.0, help="GB/s of storage per worker")
    ap.add_argument("--payload-scale", type=float, default=10_000)
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="threads per dask worker: one worker per node of this many GPUs")
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds a simulated run may take before its sleeps are scaled down")
    ap.add_argument("--keep", default="1x", help="the plan's keep budget (predict_to_zarr's default)")
    a = ap.parse_args(argv)
    rows, notes = [], []
    for name in a.models:
        model = models.seeded(getattr(models, name))
        rate = a.gpu_rate * 1e12 if a.rate == "gpu" else cpu_rate(model)
        vol = lazy_volume(a.size)
        t0 = time.perf_counter()
        p, y = plan_and_graph(model, vol, a.keep, a.gpu_memory)
        dsk = dict(y.__dask_graph__())
        build = time.perf_counter() - t0
        seconds, kinds, writes, deps = simulated(dsk, TaskCost(p), rate, a.bandwidth * 1e9)
        total = sum(seconds.values())
        cp = critical_path(seconds, deps)
        n = len(deps)
        note = (f"{name} {a.size}^3: {n:,} tasks ({len(p.barriers)} barriers; chunks {p.chunks}, "
                f"peak {p.peak_bytes / 1e9:.1f} GB/task, {p.strategy}), graph built "
                f"in {build:.1f} s, compute {p.compute_ratio:.2f}x one forward, rate "
                f"{rate / 1e12:.3g} TMAC/s ({a.rate}), one-GPU time {total:,.0f} s, "
                f"critical path {cp:.2f} s, mean task {total / n * 1e3:.1f} ms")
        print("- " + note, file=sys.stderr, flush=True)  # progress: runs take minutes
        tput = 0.0
        for g in a.gpus:
            ideal = max(total / g, cp)
            scale = min(1.0, a.budget / ideal)
            wall, stream = run_simulation(g, seconds, writes, deps, scale, a.payload_scale,
                                          a.gpus_per_node)
            busy, idle = utilization(stream, kinds, g)
            tput = max(tput, n / wall)
            rows.append((name, g, ideal, wall / scale, scale, n / wall, busy,
                         idle / scale, "scheduler" if wall > 1.5 * ideal * scale else "compute"))
            print(row_text(rows[-1]), file=sys.stderr, flush=True)
        # the scheduler passes about tput tasks/s: past total / (n / tput) GPUs it, not
        # compute, sets the wall
        notes.append(f"{note}; the scheduler ran at most {tput:,.0f} tasks/s here, so it is "
                     f"the limit past about {total / (n / tput):,.0f} GPUs (compute time "
                     f"{total:,.0f} s over {n / tput:,.0f} s of scheduling)")
    print(f"SIMULATION of volarray's {a.size}^3 graphs (sleep tasks, modelled times; see the "
          f"module docstring): plans for {a.gpu_memory:g} GB GPUs, {a.gpu_rate:g} TMAC/s per "
          f"GPU, {a.bandwidth:g} GB/s per worker, payloads / {a.payload_scale:g}, keep "
          f"{a.keep}\n")
    print("| model | GPUs | compute-bound wall s | simulated wall s | time scale "
          "| tasks/s | workers busy | idle at barriers (worker-s) | limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(row_text(r))
    print()
    for n in notes:
        print("- " + n)


def row_text(r) -> str:
    return (f"| {r[0]} | {r[1]} | {r[2]:,.1f} | {r[3]:,.1f} | {r[4]:.3g} | {r[5]:,.0f} "
            f"| {r[6]:.0%} | {r[7]:,.1f} | {r[8]} |")


if __name__ == "__main__":
    main()
