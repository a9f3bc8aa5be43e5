"""The public entry points: `predict` and `plan`."""
from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import torch

from .errors import InputError
from .execute import build_graph
from .geometry import chunk_bounds, coerce_chunks
from .io import as_dask_volume, rechunk_to
from .plan import Plan, make_plan
from .ops.local import ArgmaxConv
from .trace import fuse_argmax_head, trace

MODES = ("exact", "window")


def _device(device) -> str:
    if device is None or device == "auto":
        return "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    device = str(device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"device={device!r} is not 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} but torch sees no CUDA device; pass device='cpu'")
    return device


def _plan(model, arr: da.Array, chunks, mode, device: str, memory_limit,
          argmax: bool = False) -> Plan:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; pass a torch.nn.Module")
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {MODES}")
    if mode != "exact":
        raise InputError("volarray.plan describes exact mode; mode='window' runs one task "
                         "per window and one per output chunk, with nothing to plan")
    graph = trace(model, (1,) + tuple(arr.shape))
    if argmax:  # where the head allows it; otherwise scores are reduced per chunk
        fuse_argmax_head(graph)
    return make_plan(graph, coerce_chunks(chunks, arr.shape[1:]), memory_limit,
                     "cpu" if device == "cpu" else "cuda")


def plan(model, volume, *, chunks=None, mode: str = "exact", device=None,
         memory_limit=None, output: str = "probabilities") -> Plan:
    """What `predict` will run: stages, halos, chunks, tasks and projected memory."""
    return _plan(model, as_dask_volume(volume), chunks, mode, _device(device), memory_limit,
                 argmax=output == "argmax")


def predict(model, volume, *, chunks=None, mode: str = "exact", device=None,
            memory_limit=None, window=None, overlap: float = 0.25, blend="gaussian",
            sigma_scale=0.125, tta=None, output: str = "probabilities",
            coords: bool = False, ensemble: int | None = None, seed: int = 0,
            dtype: str | None = None):
    """Lazy ``model(volume[None])[0]`` as a dask array of shape (C_out, Z', Y', X').

    ``volume`` is a numpy, dask or zarr array shaped (Z, Y, X) or (C, Z, Y, X).
    ``chunks`` is the spatial chunk shape (int or (z, y, x)); None lets the planner
    choose from ``memory_limit`` (bytes or '4GB', per task). ``device`` is 'cpu'
    (default), 'cuda', 'cuda:N' or 'auto'. Nothing runs until the result is
    computed or stored.

    ``mode="window"``: classic sliding-window inference, equal to MONAI's
    ``sliding_window_inference`` with the same ``window`` (the patch size),
    ``overlap``, ``blend`` ("gaussian", "constant" or a callable shape -> weights)
    and ``sigma_scale``, aggregated per output chunk; the model is not traced.

    ``tta="flips"``: the mean over the 8 mirrorings of the three spatial axes
    (nnU-Net's test-time mirroring), in either mode.

    ``output="argmax"``: integer labels (Z', Y', X') per voxel (uint8, or uint16 past
    256 classes), reduced chunk by chunk. ``coords=True`` appends normalized global
    coordinate channels (z, y, x in [-1, 1] over the whole volume) to the input.

    ``dtype="float16"|"bfloat16"``: exact mode runs its tiles under ``torch.autocast``
    (results stay float32 arrays).

    ``ensemble=N`` for stochastic models (dropout left active, or noise drawn in
    ``forward`` in window mode): returns ``(mean, std)`` per voxel over N samples
    seeded from ``seed``, the same for any chunking; no sample of the whole volume is
    ever stored. In exact mode active dropout draws its masks from a hash of the
    seed and the voxel's global position.
    """
    if ensemble is not None:
        if not isinstance(ensemble, int) or ensemble < 2:
            raise InputError(f"ensemble={ensemble!r} must be an int >= 2 (samples per voxel)")
        if tta is not None or output != "probabilities":
            raise InputError("ensemble= combines with neither tta= nor output='argmax'; "
                             "reduce the returned mean yourself")
        kw = dict(chunks=chunks, mode=mode, device=device, memory_limit=memory_limit,
                  window=window, overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                  coords=coords)
        if mode == "window":
            arr = as_dask_volume(volume)
            return _window(model, with_coordinates(arr) if coords else arr, chunks, device,
                           window, overlap, blend, sigma_scale, ensemble, seed)
        samples = da.stack([predict(model, volume, seed=seed + s, **kw) for s in range(ensemble)])
        return samples.mean(axis=0), samples.std(axis=0)
    if output not in ("probabilities", "argmax"):
        raise InputError(f"output={output!r} is not 'probabilities' or 'argmax'")
    if coords:
        volume = with_coordinates(as_dask_volume(volume))
    if output == "argmax" and mode == "exact" and tta is None:
        dev = _device(device)
        arr = as_dask_volume(volume)
        p = _plan(model, arr, chunks, mode, dev, memory_limit, argmax=True)
        head = p.graph.nodes[p.graph.output].op
        if isinstance(head, ArgmaxConv):  # the classifier runs in blocks of classes
            labels_dtype = label_dtype(head.classes)
            arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], p.chunks)])
            labels = build_graph(p, arr, dev, seed=seed, autocast=_autocast(dtype))
            return labels.map_blocks(lambda b: b[0].astype(labels_dtype), dtype=labels_dtype,
                                     drop_axis=0)
    if output == "argmax":
        scores = predict(model, volume, chunks=chunks, mode=mode, device=device,
                         memory_limit=memory_limit, window=window, overlap=overlap, blend=blend,
                         sigma_scale=sigma_scale, tta=tta, seed=seed, dtype=dtype)
        return scores.map_blocks(_argmax, dtype=label_dtype(scores.shape[0]), drop_axis=0)
    if tta is not None:
        if tta != "flips":
            raise InputError(f"tta={tta!r} is not None or 'flips'")
        kw = dict(chunks=chunks, mode=mode, device=device, memory_limit=memory_limit,
                  window=window, overlap=overlap, blend=blend, sigma_scale=sigma_scale)
        return mirrored_mean(model, as_dask_volume(volume), **kw)
    dev = _device(device)
    arr = as_dask_volume(volume)
    if mode == "window":
        return _window(model, arr, chunks, device, window, overlap, blend, sigma_scale)
    p = _plan(model, arr, chunks, mode, dev, memory_limit)
    arr = rechunk_to(arr, [chunk_bounds(n, c) for n, c in zip(arr.shape[1:], p.chunks)])
    return build_graph(p, arr, dev, seed=seed, autocast=_autocast(dtype))


def _window(model, arr: da.Array, chunks, device, window, overlap, blend, sigma_scale,
            ensemble: int = 0, seed: int = 0):
    from .window import predict_window
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model is a {type(model).__name__}; pass a torch.nn.Module")
    return predict_window(model, arr.astype("float32").rechunk({0: -1}), window=window,
                          overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                          chunks=coerce_chunks(chunks, arr.shape[1:]), device=_device(device),
                          ensemble=ensemble, seed=seed)


def _autocast(dtype):
    if dtype in (None, "float32", torch.float32):
        return None
    table = {"float16": torch.float16, "bfloat16": torch.bfloat16,
             torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise InputError(f"dtype={dtype!r} is not 'float32', 'float16' or 'bfloat16'")
    return table[dtype]


def mirrored_mean(model, arr: da.Array, **kwargs) -> da.Array:
    """Mean of ``predict`` over the 8 flips of (z, y, x), each flipped back."""
    total = None
    for flips in itertools.product((False, True), repeat=3):
        axes = tuple(1 + i for i, f in enumerate(flips) if f)
        y = predict(model, da.flip(arr, axes) if axes else arr, **kwargs)
        y = da.flip(y, axes) if axes else y
        total = y if total is None else total + y.rechunk(total.chunks)
    return total / 8


def label_dtype(classes: int):
    return np.uint8 if classes <= 256 else np.uint16


def _argmax(block: np.ndarray) -> np.ndarray:
    return np.argmax(block, axis=0).astype(label_dtype(block.shape[0]))


def with_coordinates(arr: da.Array) -> da.Array:
    """``arr`` (C, Z, Y, X) with three more channels: z, y, x in [-1, 1] over the
    whole volume (np.linspace), chunked like the volume."""
    n = arr.shape[1:]
    grids = []
    for axis in range(3):
        line = da.from_array(np.linspace(-1, 1, n[axis], dtype=np.float32),
                             chunks=(arr.chunks[1 + axis],))
        shape = [1, 1, 1]
        shape[axis] = n[axis]
        grids.append(da.broadcast_to(line.reshape(shape), n, chunks=arr.chunks[1:])[None])
    return da.concatenate([arr.astype(np.float32)] + grids, axis=0).rechunk({0: -1})
