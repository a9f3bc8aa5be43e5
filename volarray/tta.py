"""Test-time augmentation: a predictor run over transformed copies of the volume, each
prediction transformed back onto the volume's grid, and the passes merged per voxel.

- ``flips``: the 8 mirrorings of the three spatial axes (nnU-Net's test-time mirroring).
- ``rot90``: the 4 quarter turns in the plane of the two lateral axes (Y, X) of the
  (Z, Y, X) volume the model sees, time or depth on Z. This is torchseis's
  ``FaultPipeline(..., infer_method="multi_angle")``: it turns its (inline, crossline,
  time) array in the (inline, crossline) plane, and its model sees (time, crossline,
  inline), so the turns are in the model's last two axes.
- ``multires``: the volume itself and its decimations ``[::2]`` along Z, Y and X in
  turn, each prediction interpolated back to the volume's size with
  ``F.interpolate(y, size=..., mode="trilinear")`` (align_corners=False): torchseis's
  ``infer_method="multi_resolution"``. An odd side n is decimated to (n + 1) // 2, and
  interpolated back with the ratio of the sizes, as ``size=`` makes torch do.

Transforms joined by ``+`` run every combination ('flips+rot90': each mirroring of each
turn, the 16 distinct ones; 'rot90+multires': each turn of each resolution), merged by
``mean`` (default) or ``max`` (torchseis's ``np.maximum.reduce``). Everything is dask
array operations over the predictor: flips and turns are lazy views, decimation is
slicing, and the interpolation back reads, per output chunk, the rows of the decimated
prediction it needs. The predictor traces the model once per distinct input shape.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import dask.array as da
import numpy as np

from .errors import InputError
from .io import canonical
from .predictors import check_model
from .resample import along_axis

TRANSFORMS = ("flips", "rot90", "multires")
MERGES = ("mean", "max")
LATERAL = (2, 3)  # the (Y, X) axes of a (C, Z, Y, X) array: the plane of rot90's turns


def canonical_tta(tta) -> str | None:
    """None, or the names of `TRANSFORMS` joined by '+' in that order ('rot90+flips' ->
    'flips+rot90')."""
    if tta is None:
        return None
    names = tta.split("+") if isinstance(tta, str) else []
    if not names or any(n not in TRANSFORMS for n in names) or len(set(names)) < len(names):
        raise InputError(f"tta={tta!r} is not one of {TRANSFORMS} or several of them joined "
                         "by '+' (e.g. 'flips+rot90'); pass e.g. tta='rot90'",
                         parameter="tta")
    return "+".join(n for n in TRANSFORMS if n in names)


def check_merge(merge, tta) -> None:
    """``merge``: None (the mean) or one of `MERGES`, and only with a ``tta``."""
    if merge is None:
        return
    if merge not in MERGES:
        raise InputError(f"merge={merge!r} is not one of {MERGES}", parameter="merge")
    if tta is None:
        raise InputError(f"merge={merge!r} merges the passes of tta=, and no tta= is given; "
                         "pass tta='flips', 'rot90' or 'multires', or leave merge out",
                         parameter="merge")


class Pass(NamedTuple):
    """One pass: the spatial axis decimated by ``[::2]`` (None: full resolution), the
    spatial axes mirrored, then the quarter turns ``np.rot90(v, turns, axes=(Y, X))``."""

    decimate: int | None
    flip: tuple[int, ...]
    turns: int


def passes(tta: str) -> list[Pass]:
    """The distinct passes of ``tta`` (canonical), the first one the volume as it is."""
    names = canonical_tta(tta).split("+")
    decimations = (None, 0, 1, 2) if "multires" in names else (None,)
    flips = [tuple(i for i, f in enumerate(fl) if f)
             for fl in itertools.product((False, True), repeat=3)] if "flips" in names else [()]
    turns = range(4) if "rot90" in names else (0,)
    found, seen = [], set()
    for d, f, k in itertools.product(decimations, flips, turns):
        probe = np.rot90(np.flip(np.arange(30).reshape(2, 3, 5), f), k, axes=(1, 2))
        key = (d, probe.shape, probe.tobytes())  # a flip and a turn may be the same map
        if key not in seen:
            seen.add(key)
            found.append(Pass(d, f, k))
    return found


def forward(arr: da.Array, p: Pass) -> da.Array:
    """``arr`` (C, Z, Y, X) mirrored and turned as pass ``p`` says (lazy views)."""
    if p.flip:
        arr = da.flip(arr, tuple(1 + a for a in p.flip))
    return da.rot90(arr, p.turns, axes=LATERAL) if p.turns else arr


def backward(y: da.Array, p: Pass) -> da.Array:
    """A prediction of ``forward(arr, p)`` turned and mirrored back onto ``arr``'s grid."""
    if p.turns:
        y = da.rot90(y, -p.turns, axes=LATERAL)
    return da.flip(y, tuple(1 + a for a in p.flip)) if p.flip else y


def decimated(arr: da.Array, axis: int | None) -> da.Array:
    """``arr`` (C, Z, Y, X) sliced ``[::2]`` along spatial ``axis`` (None: as it is)."""
    if axis is None:
        return arr
    index = [slice(None)] * 4
    index[1 + axis] = slice(None, None, 2)
    return arr[tuple(index)]


def augmented(predictor, volume, tta: str, merge: str | None = None) -> da.Array:
    """The merge (``"mean"``, default, or ``"max"``) over the passes of ``tta`` (see the
    module) of ``predictor`` (`Exact` or `Window`) over ``volume`` (C, Z, Y, X) or
    (Z, Y, X), each prediction brought back onto the volume's grid; lazy."""
    check_model(predictor.model)
    check_merge(merge, tta)
    arr = canonical(volume)
    runs = passes(tta)
    total = None
    for axis, group in itertools.groupby(runs, key=lambda p: p.decimate):
        padded, crop = predictor.padded(decimated(arr, axis))  # once per resolution
        for p in group:
            y = crop(backward(predictor.scores(forward(padded, p)), p))
            if axis is not None:
                y = resample_linear(y, 1 + axis, arr.shape[1 + axis], total.chunks[1 + axis])
            if total is None:
                total = y
            elif merge == "max":
                total = da.maximum(total, y.rechunk(total.chunks))
            else:
                total = total + y.rechunk(total.chunks)
    return total if merge == "max" else total / len(runs)


def flips(predictor, volume) -> da.Array:
    """The mean of ``predictor`` over the 8 mirrorings of the three spatial axes, each
    flipped back (nnU-Net's test-time mirroring): ``tta="flips"``; one trace and plan
    serve all 8, and a padding predictor pads once."""
    return augmented(predictor, volume, "flips")


def linear_weights(size_in: int, size_out: int):
    """For each output index of a linear resampling from ``size_in`` to ``size_out``
    points, as ``F.interpolate(..., size=size_out, align_corners=False)`` computes it
    (float32, the ratio of the sizes, source indices clamped at 0 and at the last
    point): the two source indices and the second one's weight."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, w1


def resample_linear(y: da.Array, axis: int, size: int, chunks) -> da.Array:
    """``y`` resampled along ``axis`` to ``size`` points, linearly, as
    ``F.interpolate(mode="trilinear", size=...)`` resamples that axis (the others keep
    their size), with output chunks ``chunks`` along ``axis``: each output chunk reads
    only the rows of ``y`` it needs (two or three more than half its length)."""
    if y.shape[axis] == size:
        return y
    i0, i1, w1 = linear_weights(y.shape[axis], size)
    return along_axis(y, axis, chunks, lambda o0, o1: (int(i0[o0]), int(i1[o1 - 1]) + 1),
                      interpolate_rows,
                      lambda o0, o1, j0, j1: {"axis": axis, "i0": i0[o0:o1] - j0,
                                              "i1": i1[o0:o1] - j0, "w1": w1[o0:o1]},
                      y.dtype)


def interpolate_rows(block: np.ndarray, axis: int, i0, i1, w1) -> np.ndarray:
    """``(1 - w1) * block[i0] + w1 * block[i1]`` along ``axis`` (torch's lambda0 and
    lambda1), in the block's type."""
    shape = [1] * block.ndim
    shape[axis] = len(w1)
    w1 = w1.astype(block.dtype).reshape(shape)
    w0 = (1 - w1).astype(block.dtype)
    return w0 * np.take(block, i0, axis=axis) + w1 * np.take(block, i1, axis=axis)
