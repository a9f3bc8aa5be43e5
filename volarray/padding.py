"""Pad a volume to the sides a model accepts, and crop its prediction back.

Encoder-decoder networks (FaultSeg3D and most U-Nets) pool by 2 several times and
concatenate each upsampled level with its skip connection, so every side must be a
multiple of 2**levels: plain torch's whole-volume forward fails on other shapes too.
Users of that forward pad to the next multiple and crop the prediction back; these
helpers do the same, lazily, on dask arrays. Padding goes at the high end of each
spatial axis only, so voxel i of the padded volume is voxel i of the volume and the
prediction's first voxels are those of the original extent.

    multiple = required_multiple(model, 1, vol.shape[1:])            # (8, 8, 8) or None
    padded = pad_volume(vol, multiple, "reflect")
    y = crop_output(predict(model, padded), vol.shape[1:], padded.shape[1:])
"""
from __future__ import annotations

import math
from fractions import Fraction

import dask.array as da

from .errors import InputError, VolarrayError
from .modelcall import meta_forward, model_dtype

MULTIPLES = (2, 4, 8, 16, 32, 64, 128)
PAD_MODES = ("reflect", "zeros")
AXES = ("z", "y", "x")


# ---------------------------------------------------------------- arguments
def check_pad_mode(mode) -> str:
    """``mode`` if it is one of PAD_MODES; an InputError naming it otherwise."""
    if not isinstance(mode, str) or mode not in PAD_MODES:
        raise InputError(f"pad={mode!r} is not one of {PAD_MODES}; pass pad='reflect' (mirror "
                         "the volume at its high end) or pad='zeros'", parameter='pad')
    return mode


def _per_axis(multiple, n: int) -> tuple[int, ...]:
    """One positive int per axis from an int or a sequence of n ints."""
    values = (multiple,) * n if isinstance(multiple, int) else multiple
    try:
        values = tuple(values)
    except TypeError:
        values = ()
    if len(values) != n or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0
                                   for m in values):
        raise InputError(f"multiple={multiple!r} must be a positive int or {n} positive ints "
                         "(one per spatial axis)", parameter='multiple')
    return values


def _spatial(shape, what: str) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) < 3:
        raise InputError(f"{what}={shape} has fewer than 3 (Z, Y, X) sides")
    return shape[-3:]


# ---------------------------------------------------------------- shapes
def padded_shape(shape, multiple) -> tuple[int, ...]:
    """``shape`` with every side rounded up to the next multiple of ``multiple``
    (an int, or one int per side); padding goes at the high end of each axis."""
    shape = tuple(int(n) for n in shape)
    return tuple(-(-n // m) * m for n, m in zip(shape, _per_axis(multiple, len(shape))))


def _meta_forward(model, in_channels: int):
    """A memoized predicate: does ``model``'s own forward run on meta tensors of a
    (Z, Y, X) shape? Free at any size."""
    dtype = model_dtype(model)
    seen: dict[tuple, bool] = {}

    def runs(shape) -> bool:
        shape = tuple(shape)
        if shape not in seen:
            try:
                meta_forward(model, (1, in_channels) + shape, dtype)
                seen[shape] = True
            except Exception:  # any failure of the forward: this shape does not run
                seen[shape] = False
        return seen[shape]
    return runs


def required_multiple(model, in_channels: int, shape) -> tuple[int, int, int] | None:
    """The per-axis multiple the volume's (Z, Y, X) sides must be padded to, or None.

    None when the model's forward already runs on ``shape``, or when no multiple in
    MULTIPLES (2 to 128) makes it run. Otherwise the smallest m such that padding every
    side up to a multiple of m runs, then lowered per axis (to 1 at least) where a
    smaller multiple suffices, that is pads that side less and still runs (a model
    pooling z by 2 and y, x by 8 gives (2, 8, 8) for z=101); sides already multiples
    of m keep m. The sides to pad are those with ``side % multiple != 0``.
    Runs on meta tensors: free at any size, a few milliseconds per probe.
    """
    shape = _spatial(shape, "shape")
    runs = _meta_forward(model, in_channels)
    if runs(shape):
        return None
    for m in MULTIPLES:
        target = padded_shape(shape, m)
        # the next multiple must run too: 32 runs for a network that needs 8 because it
        # is a multiple of 8, not of 4
        if target != shape and runs(target) and runs(tuple(t + m for t in target)):
            break
    else:
        return None
    multiple = [m] * 3
    for axis in range(3):
        if shape[axis] % m == 0:
            continue
        for k in (1,) + MULTIPLES:
            if k >= m:
                break
            trial = list(multiple)
            trial[axis] = k
            padded = padded_shape(shape, trial)
            # k must pad less than m does: 30 padded to a multiple of 4 is 32, which
            # runs because it is a multiple of 8, not because 4 suffices
            if padded[axis] < padded_shape(shape, multiple)[axis] and runs(padded):
                multiple[axis] = k
                break
    return tuple(multiple)


# ---------------------------------------------------------------- the error
def _plural(items: list[str], one: str, many: str) -> str:
    return f"{one} {items[0]}" if len(items) == 1 else f"{many} {', '.join(items)}"


def _downsampling(graph, axes) -> tuple[int, ...] | None:
    """The model's total downsampling along ``axes``, from a traced graph's grid scales."""
    factors = []
    for a in axes:
        smallest = min((n.scale[a] for n in graph.nodes.values()), default=Fraction(1))
        f = 1 / smallest
        if smallest >= 1 or f.denominator != 1:
            return None
        factors.append(int(f))
    return tuple(factors)


def padding_error(name: str, model, in_channels: int, shape, trace_shape) -> str | None:
    """The message for a volume whose sides the model cannot take, when padding them to
    ``required_multiple`` makes ``trace_shape(padded)`` succeed; None otherwise.

    ``trace_shape(shape)`` traces the model for a (Z, Y, X) shape and returns the graph,
    raising a VolarrayError where it cannot.
    """
    shape = _spatial(shape, "shape")
    multiple = required_multiple(model, in_channels, shape)
    if multiple is None:
        return None
    target = padded_shape(shape, multiple)
    try:
        graph = trace_shape(target)
    except VolarrayError:
        return None
    bad = [a for a in range(3) if shape[a] % multiple[a]]
    label = (lambda a: str(shape[a])) if len(bad) == 3 else (lambda a: f"{AXES[a]}={shape[a]}")
    groups = {}
    for a in bad:
        groups.setdefault(multiple[a], []).append(a)
    what = "; ".join(
        _plural([label(a) for a in axes], "side", "sides")
        + (f" is not a multiple of {m}" if len(axes) == 1 else f" are not multiples of {m}")
        for m, axes in groups.items())
    down = _downsampling(graph, bad)
    if down == tuple(multiple[a] for a in bad):
        why = (f" (it downsamples by {down[0]})" if len(set(down)) == 1 else
               " (it downsamples by " + ", ".join(f"{d} along {AXES[a]}" for a, d
                                                   in zip(bad, down)) + ")")
    else:
        why = ""
    crop = tuple(n // m * m for n, m in zip(shape, multiple))
    crop_hint = ""
    if min(crop) > 0:
        try:
            trace_shape(crop)
            crop_hint = f", or crop the volume to {crop}"
        except VolarrayError:
            pass
    return (f"volume shape {shape}: {what}, which {name} needs{why}; pass pad='reflect' or "
            f"pad='zeros' to pad to {target} and crop the "
            f"prediction back{crop_hint}")


# ---------------------------------------------------------------- pad and crop
def pad_volume(arr, multiple, mode: str = "reflect") -> da.Array:
    """``arr`` (C, Z, Y, X) padded at the high end of each spatial axis to the next
    multiple of ``multiple`` (an int or one per axis), lazily with ``dask.array.pad``.

    ``mode="reflect"`` mirrors the volume without repeating the edge voxel (numpy's and
    torch's "reflect"), which needs each axis's padding to be smaller than its side;
    ``mode="zeros"`` pads with 0. Voxel i of the result is voxel i of ``arr``; its
    chunks are ``arr``'s, with the padding added to the last chunk of each axis.
    """
    mode = check_pad_mode(mode)
    if not isinstance(arr, da.Array):
        arr = da.asarray(arr)
    if arr.ndim != 4:
        raise InputError(f"pad_volume takes a (C, Z, Y, X) array; got shape {arr.shape}")
    shape = tuple(arr.shape[1:])
    multiple = _per_axis(multiple, 3)
    widths = [t - n for t, n in zip(padded_shape(shape, multiple), shape)]
    if not any(widths):
        return arr
    if mode == "reflect":
        for a, (n, w) in enumerate(zip(shape, widths)):
            if w >= n:
                raise InputError(
                    f"pad='reflect' cannot pad side {AXES[a]}={n} by {w} voxels to a multiple "
                    f"of {multiple[a]}: reflection needs the padding to be smaller than the "
                    "side; pass pad='zeros'", parameter='pad')
    pad_width = [(0, 0)] + [(0, w) for w in widths]
    if mode == "reflect":
        out = da.pad(arr, pad_width, mode="reflect")
    else:
        out = da.pad(arr, pad_width, mode="constant", constant_values=0)
    # keep the volume's own chunks; the padding joins the last chunk of each axis
    chunks = (out.chunks[0],) + tuple(c[:-1] + (c[-1] + w,) if w else c
                                      for c, w in zip(arr.chunks[1:], widths))
    return out.rechunk(chunks)


def crop_output(y, in_shape, padded_in_shape) -> da.Array:
    """The prediction of the original extent, cut from the prediction ``y`` (C, Z', Y', X')
    of a volume padded at its high end from ``in_shape`` to ``padded_in_shape``.

    Rule, per spatial axis with original side n, padded side p and output side q: keep
    the first ceil(n * q / p) voxels, the output voxels whose footprint starts inside
    the original extent. Same-size outputs (q = p) keep n; a half-resolution output keeps
    ceil(n / 2); a doubled one 2n. The output must be such a rescaling of the padded
    input (q / p an integer or 1 / integer); a model that trims a border (valid
    convolutions) is refused, since the cut would then depend on the border.
    ``in_shape`` and ``padded_in_shape`` may include the channel axis (the last three
    entries are used).
    """
    n_in = _spatial(in_shape, "in_shape")
    n_pad = _spatial(padded_in_shape, "padded_in_shape")
    if not isinstance(y, da.Array):
        y = da.asarray(y)
    if y.ndim != 4:
        raise InputError(f"crop_output takes a (C, Z', Y', X') prediction; got shape {y.shape}")
    keep = []
    for a, (n, p, q) in enumerate(zip(n_in, n_pad, y.shape[1:])):
        if not 0 < n <= p:
            raise InputError(f"in_shape {n_in} is not within padded_in_shape {n_pad} "
                             f"along {AXES[a]}")
        r = Fraction(q, p)
        if r.numerator != 1 and r.denominator != 1:
            raise InputError(
                f"the prediction's side {AXES[a]}={q} is not a rescaling of the padded side "
                f"{p} (ratio {r}); crop_output cannot tell which voxels belong to the original "
                f"side {n}")
        keep.append(math.ceil(n * r))
    return y[:, :keep[0], :keep[1], :keep[2]]
