"""Sliding-window mode: MONAI's window placement and blending, aggregated per output chunk.

Windows are placed, weighted and normalized exactly as MONAI's
``sliding_window_inference`` does it (scan interval ``int(roi * (1 - overlap))``,
the last window shifted back inside the volume, a gaussian importance map with
sigma = roi * sigma_scale clamped at its smallest value, symmetric zero padding of
volumes smaller than the window). Each window's prediction is one task; each
output chunk sums the weighted windows that overlap it and divides by their
weights, so no task ever holds the whole output. The model is called as is: no
tracing, so any model works. Placement and weights can be another tool's
(`volarray.nnunet` passes nnU-Net's ``compute_steps_for_sliding_window`` and gaussian).
"""
from __future__ import annotations

import itertools
import math

import dask.array as da
import numpy as np
import torch
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .errors import InputError
from .worker import OnDevice, assemble
from .geometry import Box, chunk_bounds, chunk_range, grid_boxes
from .heap import heap_policy, release_freed_memory, use_mapped_tensors
from .io import check_finite
from .diagnostics import first_line, user_frame
from .modelcall import meta_forward, pick_output
from .taskcount import chunk_count, fewer_chunks, warn_of_many_tasks


def scan_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis (MONAI's _get_scan_interval + dense_patch_slices)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    num = math.ceil(size / interval)
    count = next((d for d in range(num) if d * interval + roi >= size), None)
    count = 1 if count is None else count + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def window_starts(size: int, roi: int, overlap: float, placement="monai") -> list[int]:
    """Window starts along one axis of (padded) length ``size``: MONAI's placement, or
    ``placement(size, roi)`` (nnU-Net's ``compute_steps_for_sliding_window`` for one
    axis, as `volarray.nnunet` passes it), checked to cover the axis."""
    if placement == "monai":
        return scan_starts(size, roi, overlap)
    if not callable(placement):
        raise InputError(f"placement={placement!r} is not 'monai' or a callable "
                         "(size, window) -> window starts along one axis")
    starts = [int(s) for s in placement(size, roi)]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if not starts or starts[0] != 0 or starts[-1] != size - roi or \
            any(g <= 0 or g > roi for g in gaps):
        raise InputError(f"placement returned window starts {starts} for an axis of {size} "
                         f"and a window of {roi}; they must rise from 0 to {size - roi} in "
                         f"steps of 1 to {roi}, so that the windows cover the axis")
    return starts


def importance_map(roi, blend_mode="gaussian", sigma_scale=0.125) -> np.ndarray:
    """The per-window weights (MONAI's compute_importance_map), float32."""
    if callable(blend_mode):
        w = np.asarray(blend_mode(tuple(roi)), dtype=np.float32)
        if w.shape != tuple(roi):
            raise InputError(f"blend_mode callable returned weights of shape {w.shape}; the "
                             f"window is {tuple(roi)}", parameter="blend_mode")
        return w
    if blend_mode == "constant":
        return np.ones(roi, dtype=np.float32)
    check_blend_mode(blend_mode)
    check_sigma_scale(sigma_scale)
    scales = sigma_scale if isinstance(sigma_scale, (tuple, list)) else (sigma_scale,) * 3
    w = None
    for size, s in zip(roi, scales):
        x = torch.arange(start=-(size - 1) / 2.0, end=(size - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x ** 2 / (-2 * (size * s) ** 2))
        w = x if w is None else w.unsqueeze(-1) * x
    w = torch.clamp(w, min=max(torch.min(w).item(), 1e-3))
    return w.numpy().astype(np.float32)


def check_blend_mode(blend_mode) -> None:
    if not callable(blend_mode) and blend_mode not in ("gaussian", "constant"):
        raise InputError(f"blend_mode={blend_mode!r} is not 'gaussian', 'constant' or a "
                         "callable roi_shape -> weights", parameter="blend_mode")


def check_sigma_scale(sigma_scale) -> None:
    scales = sigma_scale if isinstance(sigma_scale, (tuple, list)) else (sigma_scale,) * 3
    if len(scales) != 3 or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                   and s > 0 for s in scales):
        raise InputError(f"sigma_scale={sigma_scale!r} must be positive (one number or three); "
                         "the gaussian's sigma is sigma_scale x the window, 0.125 by default",
                         parameter="sigma_scale")


def check_window(roi_size, overlap, blend_mode, sigma_scale=0.125) -> tuple[int, int, int]:
    """The window's (z, y, x) size from ``roi_size``; bad settings refused by name."""
    if roi_size is None:
        raise InputError("method='window' needs roi_size=, the model's patch size, e.g. 96 "
                         "or (64, 128, 128)", parameter="roi_size")
    sides = (roi_size,) * 3 if np.isscalar(roi_size) else tuple(roi_size)
    if len(sides) != 3 or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                                  and w > 0 for w in sides):
        raise InputError(f"roi_size={roi_size!r} must be one positive int or three",
                         parameter="roi_size")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or \
            not 0 <= overlap < 1:
        raise InputError(f"overlap={overlap!r} must be in [0, 1)", parameter="overlap")
    check_blend_mode(blend_mode)
    check_sigma_scale(sigma_scale)
    return tuple(int(w) for w in sides)


class WindowRunner(OnDevice):
    """Worker-side: the model on its device, called on one window at a time."""

    def __init__(self, model, device: str, weights: np.ndarray, select=None):
        self.model, self.device, self.weights, self.select = model, device, weights, select
        heap_policy()  # a bad VOLARRAY_HEAP is refused here, before any window runs
        self._init_cache()

    def run(self, x: np.ndarray, samples: int = 0, seed: int = 0, lo=()) -> np.ndarray:
        """The weighted prediction of one window: model(x) * importance map; with
        ``samples``, that many draws of a stochastic model, stacked, each seeded by
        (seed, sample, window position) so any chunking draws the same ones."""
        model = self.on_device(self.model)
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        t = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device, dtype)
        if samples:
            ys = []
            for s in range(samples):
                # the global RNG is process-wide: one seeded draw at a time
                with self._lock, torch.random.fork_rng(devices=[]), torch.inference_mode():
                    torch.manual_seed(int(tokenize(seed, s, tuple(lo))[:15], 16))
                    ys.append(self._forward(model, t))
            return np.stack(ys) * self.weights
        with torch.inference_mode():
            return self._forward(model, t) * self.weights

    def _forward(self, model, t: torch.Tensor) -> np.ndarray:
        y = pick_output(model(t), self.select)[0]
        if tuple(y.shape[1:]) != tuple(t.shape[2:]):
            raise InputError(f"window mode needs an output of the window's size; the model "
                             f"returned {tuple(y.shape[1:])} for a window of {tuple(t.shape[2:])}")
        return y.float().cpu().numpy()


def run_window(runner, lo, hi, parts, samples=0, seed=0):
    # zeros outside the volume: MONAI's padding of volumes smaller than the window
    x = assemble((lo, hi), parts[0][1].shape[0], parts, fill=0.0)
    check_finite(x, lo)
    use_mapped_tensors()
    try:
        return runner.run(x, samples, seed, lo)
    finally:
        release_freed_memory()  # as exact mode's tasks: the window's intermediates


def blend_chunk(weights, lo, hi, windows):
    """Sum of weighted window predictions over one output chunk, divided by the sum
    of their weights."""
    box = Box.from_bounds(lo, hi)
    out = count = None
    for (wlo, whi), pred in windows:
        inter = box.intersect(Box.from_bounds(wlo, whi))
        lead = (slice(None),) * (pred.ndim - 3)  # (C,) or (samples, C)
        src, dst = lead + inter.slices(wlo), lead + inter.slices(box.lo)
        if out is None:
            out = np.zeros(pred.shape[:-3] + box.shape, dtype=np.float32)
            count = np.zeros(box.shape, dtype=np.float32)
        out[dst] += pred[src]
        count[inter.slices(box.lo)] += weights[inter.slices(wlo)]
    if out is None:
        raise InputError(f"window mode: output chunk {box} has no window (it lies wholly "
                         "outside the mask, and is never computed)")
    uncovered = count == 0  # voxels only windows skipped by a mask cover: outside the
    if uncovered.any():  # mask, 0 here, the fill value in the masked result
        count[uncovered] = 1
    out /= count
    if out.ndim == 5:  # ensemble: mean and std over the samples of this chunk only
        return np.stack([out.mean(axis=0), out.std(axis=0)])
    return out


def predict_window(model, arr: da.Array, *, roi_size, overlap=0.25, blend_mode="gaussian",
                   sigma_scale=0.125, chunks=None, device="cpu", select=None,
                   ensemble: int = 0, seed: int = 0, placement="monai", model_token=None,
                   mask=None):
    """Sliding-window prediction of ``arr`` (C, Z, Y, X) as a lazy dask array; with
    ``ensemble=N``, the (mean, std) over N seeded samples. ``placement``: "monai", or a
    callable (size, window) -> starts along one axis (see `window_starts`).
    ``model_token``: the model's `weights_token`, when the caller has it already.
    ``mask``: a `volarray.masking.Mask`: windows wholly outside it are not run, and
    output chunks wholly outside it are left out (the masked result fills them)."""
    shape = tuple(arr.shape[1:])
    roi = check_window(roi_size, overlap, blend_mode)
    image = tuple(max(s, r) for s, r in zip(shape, roi))
    pad = tuple((i - s) // 2 for i, s in zip(image, shape))  # volumes smaller than the window
    starts = [window_starts(i, r, overlap, placement) for i, r in zip(image, roi)]
    weights = importance_map(roi, blend_mode, sigma_scale)
    runner = WindowRunner(model, device, weights, select)
    chunks = roi if chunks is None else tuple(r if c is None else c for c, r in zip(chunks, roi))
    out_bounds = [chunk_bounds(n, min(c, n)) for n, c in zip(shape, chunks)]
    warn_of_many_windows(shape, roi, overlap, chunks, starts)
    in_bounds = [np.cumsum((0,) + c) for c in arr.chunks[1:]]
    token = tokenize(arr.name, roi, overlap, blend_mode if not callable(blend_mode) else weights,
                     sigma_scale, chunks, device, select, ensemble, seed,
                     model_token or weights_token(model),
                     *(() if placement == "monai" else (starts,)))
    model_key = f"volarray-window-model-{token}"
    wname, oname = f"volarray-window-{token}", f"volarray-blend-{token}"
    dsk = {model_key: runner}
    windows = []  # (lo, hi) in volume coordinates (may reach outside when padded)
    live = None if mask is None else window_liveness(mask, starts, pad, roi, out_bounds)
    for idx, start in enumerate(itertools.product(*starts)):  # MONAI's scan order
        lo = tuple(s - p for s, p in zip(start, pad))
        hi = tuple(a + r for a, r in zip(lo, roi))
        if live is not None and live.state(lo, hi) == 0:
            windows.append(None)  # wholly outside the mask: never run
            continue
        box = Box.from_bounds(lo, hi).intersect(Box.from_bounds((0, 0, 0), shape))
        parts = []
        ranges = [chunk_range(b, iv) for b, iv in zip(in_bounds, box.axes)]
        for i, j, k in itertools.product(*ranges):
            clo = (int(in_bounds[0][i]), int(in_bounds[1][j]), int(in_bounds[2][k]))
            chi = (int(in_bounds[0][i + 1]), int(in_bounds[1][j + 1]), int(in_bounds[2][k + 1]))
            parts.append([(clo, chi), (arr.name, 0, i, j, k)])
        dsk[(wname, idx)] = (run_window, model_key, lo, hi, parts, ensemble, seed)
        windows.append((lo, hi))
    for idx, box in grid_boxes(out_bounds):
        hits = [[w, (wname, n)] for n, w in enumerate(windows)
                if w is not None and not box.intersect(Box.from_bounds(*w)).empty]
        if not hits:  # wholly outside the mask: the masked result fills it
            continue
        lead = (0, 0) if ensemble else (0,)  # ensemble blocks: (mean|std, C, z, y, x)
        dsk[(oname,) + lead + idx] = (blend_chunk, weights, box.lo, box.hi, hits)
    c_out = _out_channels(model, arr.shape[0], roi, device, select)
    graph = HighLevelGraph.from_collections(oname, dsk, dependencies=[arr])
    spatial = tuple(tuple(int(x) for x in np.diff(b)) for b in out_bounds)
    if ensemble:
        both = da.Array(graph, oname, chunks=((2,), (c_out,)) + spatial,
                        meta=np.empty((0,) * 5, np.float32))
        return both[0], both[1]
    return da.Array(graph, oname, chunks=((c_out,),) + spatial,
                    meta=np.empty((0,) * 4, np.float32))


def window_liveness(mask, starts, pad, roi, out_bounds):
    """The mask's states on the grid of every window's and output chunk's edges."""
    edges = []
    for axis, (axis_starts, p, r, b) in enumerate(zip(starts, pad, roi, out_bounds)):
        n = int(b[-1])
        cut = {0, n} | {int(v) for v in b}
        for s in axis_starts:
            cut |= {min(max(s - p, 0), n), min(max(s - p + r, 0), n)}
        edges.append(sorted(cut))
    return mask.liveness(edges)


def warn_of_many_windows(shape, roi, overlap, chunks, starts) -> None:
    """Before the graph is built: a TaskCountWarning when its windows and output
    chunks pass the planner's TASK_WARNING tasks."""
    windows, blocks = math.prod(len(s) for s in starts), chunk_count(shape, chunks)
    fix = fewer_chunks(shape) if blocks >= windows else \
        "pass a larger roi_size or a smaller overlap"
    warn_of_many_tasks(windows + blocks, f"roi_size={roi} with overlap={overlap} makes "
                       f"{windows:,} windows and chunks={tuple(chunks)} {blocks:,} output "
                       "chunks", fix)


def _out_channels(model, c_in: int, roi, device, select=None) -> int:
    """The model's output channels, from a forward on meta tensors (free, and the
    model is left exactly as it was), or on one real window when the model does not
    run on meta tensors."""
    shape = (1, c_in) + tuple(roi)
    try:
        y = meta_forward(model, shape)
    except Exception:
        from .devices import model_on
        on_device = model_on(model, device)  # a copy where the model is elsewhere
        try:
            with torch.inference_mode():
                y = on_device(torch.zeros(shape, device=device))
        except Exception as e:  # as exact mode's capture names it: the model's line
            raise InputError(
                f"method='window' could not run {type(model).__name__} on a window of shape "
                f"{shape}{user_frame(e)}: {type(e).__name__}: {first_line(e)}. Window mode "
                "calls the model on batches of 3-D windows (N, C, Z, Y, X) of roi_size; "
                "pass a 3-D model", parameter="model") from e
    y = pick_output(y, select)
    if y.ndim != 5:
        raise InputError(f"method='window': {type(model).__name__} returned a tensor of shape "
                         f"{tuple(y.shape)} for windows of shape {shape}; window mode needs "
                         "(N, C, Z, Y, X) back, the window's size", parameter="model")
    return int(y.shape[1])


def weights_token(model) -> str:
    """A deterministic token of the model's class and weights."""
    from .devices import token_array
    return tokenize(type(model).__name__,
                    [(k, token_array(v)) for k, v in model.state_dict().items()])
