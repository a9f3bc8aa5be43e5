"""How a task runs on a device: which of the run's devices it takes, the runner bound
to that device, and float32 precision while it runs.

A plan's ``strategy`` says how a task runs its stage: ``"slab"`` sweeps the task's
region along z in cache-sized slabs (the CPU's: the working set stays in cache), and
``"whole"`` runs each layer over the whole region in one launch (a GPU's: few large
kernels, the data staying on the device). `stage_rows` is the one place the worker asks.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref

from .devices import SLOTS, device_names, float32_precision, torch_device

_bound: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def stage_rows(plan, part) -> int | None:
    """Rows per slab of a stage's (or barrier's) task: None (the whole region) for the
    'whole' strategy."""
    return None if plan.strategy == "whole" else part.slab


def bind(runner, name: str):
    """``runner`` on device ``name``: itself where it runs there, else a copy of it (its
    model copied to that device on first use), one per device per process."""
    device = torch_device(name)
    if device == runner.device:
        return runner
    with _lock:
        per = _bound.setdefault(runner, {})
        if device not in per:
            bound = copy.copy(runner)  # its caches (the model on a device) start empty
            bound.device = device
            per[device] = bound
        return per[device]


@contextlib.contextmanager
def on_task_device(runner):
    """Within the block: the runner bound to the least loaded of its devices (at most
    `volarray.devices.IN_FLIGHT` tasks in flight on each GPU), TF32 off unless the plan
    asked for it (``compute_dtype='tf32'``), the flags put back after."""
    with SLOTS.use(device_names(runner.device)) as name, \
            float32_precision(getattr(runner, "tf32", False)):
        yield bind(runner, name)


def first_device(runner):
    """``runner`` bound to the first of its devices (whole-volume evaluations)."""
    return bind(runner, device_names(runner.device)[0])
