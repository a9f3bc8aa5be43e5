"""The public entry points: `predict` and `plan`."""
from __future__ import annotations

import dask.array as da
import torch

from .errors import InputError
from .execute import build_graph
from .geometry import coerce_chunks
from .io import as_dask_volume, rechunk_to
from .plan import Plan, make_plan, stage_bounds
from .trace import trace

MODES = ("exact",)


def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; pass a torch.nn.Module")


def _device(device) -> str:
    if device is None or device == "auto":
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but torch sees no CUDA device; pass device='cpu'")
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"device={device!r} is not 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


def plan(model, volume, *, chunks=None, mode: str = "exact", device=None,
         memory_limit=None) -> Plan:
    """What `predict` will run: stages, halos, chunks, tasks and projected memory."""
    _check_model(model)
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {MODES}")
    dev = _device(device)
    arr = as_dask_volume(volume)
    graph = trace(model, (1,) + tuple(arr.shape))
    return make_plan(graph, coerce_chunks(chunks, arr.shape[1:]), memory_limit,
                     "cpu" if dev == "cpu" else "cuda")


def predict(model, volume, *, chunks=None, mode: str = "exact", device=None,
            memory_limit=None) -> da.Array:
    """Lazy ``model(volume[None])[0]`` as a dask array of shape (C_out, Z', Y', X').

    ``volume`` is a numpy, dask or zarr array shaped (Z, Y, X) or (C, Z, Y, X).
    ``chunks`` is the spatial chunk shape (int or (z, y, x)); None lets the planner
    choose from ``memory_limit`` (bytes or '4GB', per task). Nothing runs until the
    result is computed or stored.
    """
    p = plan(model, volume, chunks=chunks, mode=mode, device=device, memory_limit=memory_limit)
    arr = as_dask_volume(volume)
    inp = p.graph.nodes[p.graph.input]
    arr = rechunk_to(arr, stage_bounds(p.chunks, inp.shape, inp.scale))
    return build_graph(p, arr, _device(device))
