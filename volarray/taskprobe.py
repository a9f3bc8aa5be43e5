"""A real task's overhead, measured through volarray's own engine, for the cost model's
per-task rate (`volarray.rates`).

A trivial dask task costs 0.07 ms here; a volarray task reads its region, assembles
and writes its output, runs its ops' calls and merges its statistics: 1.0-1.3 ms
measured with this probe, and a norm network's plan has thousands of them
(InstanceNormUNet at 256^3: 1,280). The probe runs one tiny conv-InstanceNorm-conv
network over a 48^3 volume twice, in 24^3 chunks and in 8^3 chunks, through the
threaded scheduler as `volarray.predict(...).compute()` does, and takes the time per
task from the difference, so that capture, planning and the run's fixed costs cancel.

It sits above the engine and is registered with `volarray.rates` when volarray is
imported (`rates.use_task_probe`): the rates module sits below the planner and cannot
call the engine itself.
"""
from __future__ import annotations

import contextlib
import logging
import time

SIDE = 48
CHUNKS = (24, 8)  # few tasks, many tasks


def engine_task_seconds(device: str = "cpu") -> float:
    """Seconds of overhead per task of volarray's in-process engine on ``device``: the
    best of two runs per chunking, of one graph per chunking built before the clock
    starts."""
    import dask
    import numpy as np
    import torch
    import torch.nn as nn

    from .api import plan, predict
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 1), nn.InstanceNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 1, 1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    vol = np.random.default_rng(0).standard_normal((SIDE,) * 3).astype(np.float32)

    def run(lazy) -> float:
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads"):
            lazy.compute()
        return time.perf_counter() - t0

    with quiet():
        lazies = [predict(model, vol, chunks=c, device=device) for c in CHUNKS]
        run(lazies[0])  # warm-up: the scheduler's threads, the first tiles' memory
        few_s, many_s = (min(run(lazy) for _ in range(2)) for lazy in lazies)
        # the tasks the projection charges this overhead to (`Plan.costed_tasks`)
        few, many = (plan(model, vol, chunks=c, device=device).costed_tasks for c in CHUNKS)
    return max(0.0, (many_s - few_s) / (many - few))


@contextlib.contextmanager
def quiet():
    """The probe's tracing and planning lines off the progress log (a first run on the
    command line would show them)."""
    log = logging.getLogger("volarray.progress")
    was = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = was
