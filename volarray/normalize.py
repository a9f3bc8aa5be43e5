"""Whole-volume normalization, ``normalize=``.

Models expect their input scaled the way they were trained: seismic nets by the
survey's mean and standard deviation (or clipped percentiles), nnU-Net's CT models by
the training set's clip range, mean and std. Statistics of each chunk would change the
answer chunk by chunk, as per-patch norms do, so the statistics here are dask reductions
over the whole volume, computed once per channel; the transform they define is pointwise
and runs inside each task on the region it reads.

- ``"zscore"``: ``(x - mean) / std`` with the volume's mean and population std (ddof=0).
- ``"percentile"``: clip to the volume's 0.5 and 99.5 percentiles (others with
  ``{"percentiles": (1, 99)}``), then z-score the clipped volume. Percentiles come from a
  histogram of the whole volume: exact for integer volumes (one bin per value), within
  1/65536 of the value range for floating-point ones.
- ``{"mean": m, "std": s, "clip": (lo, hi)}``: given statistics (a training set's; nnU-Net's
  CT scheme clips first), one number or one per channel.
- a callable ``f(block) -> block`` applied to each region; it must be pointwise (it is
  checked on a probe of the volume: a per-chunk z-score is refused).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np

from .errors import InputError

PERCENTILES = (0.5, 99.5)
HISTOGRAM_BINS = 65536
SCHEMES = ("zscore", "percentile")


@dataclass(frozen=True)
class Normalization:
    """A pointwise per-channel transform: clip to ``clip`` (when set), then
    ``(x - mean) / std``; float32 out, computed in float64."""

    mean: tuple
    std: tuple
    clip: tuple | None = None  # per channel (lo, hi)
    scheme: str = "given"
    percentiles: tuple | None = None

    def __call__(self, block: np.ndarray) -> np.ndarray:
        x = np.asarray(block, dtype=np.float64)
        shape = (-1,) + (1,) * (x.ndim - 1)
        if self.clip is not None:
            lo, hi = (np.array(v, np.float64).reshape(shape) for v in zip(*self.clip))
            x = np.clip(x, lo, hi)
        x = (x - np.array(self.mean, np.float64).reshape(shape)) / \
            np.array(self.std, np.float64).reshape(shape)
        return x.astype(np.float32)

    @property
    def attrs(self) -> dict:
        """The statistics, for the output's attributes (JSON values)."""
        out = {"normalize": self.scheme, "normalize_mean": list(self.mean),
               "normalize_std": list(self.std)}
        if self.clip is not None:
            out["normalize_clip"] = [list(c) for c in self.clip]
        if self.percentiles is not None:
            out["normalize_percentiles"] = list(self.percentiles)
        return out


@dataclass(frozen=True)
class Pointwise:
    """A user's callable, checked pointwise, applied to each region (float32 out)."""

    fn: object

    def __call__(self, block: np.ndarray) -> np.ndarray:
        # float32 in: an integer volume's arithmetic must not wrap around
        return np.asarray(self.fn(np.asarray(block, np.float32)), dtype=np.float32)

    def __dask_tokenize__(self):  # the same function in another run resumes its output
        code = getattr(self.fn, "__code__", None)
        return (getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", None),
                code.co_code if code is not None else repr(type(self.fn)))

    @property
    def attrs(self) -> dict:
        return {"normalize": getattr(self.fn, "__qualname__", repr(self.fn))}


def resolve(normalize, arr: da.Array):
    """The transform ``normalize=`` asks for over the (C, Z, Y, X) volume ``arr``:
    None, a `Normalization` (statistics computed here, one pass or three over the
    volume) or a checked `Pointwise` callable."""
    if normalize is None or isinstance(normalize, (Normalization, Pointwise)):
        return normalize
    channels = arr.shape[0]
    if isinstance(normalize, str):
        if normalize not in SCHEMES:
            raise InputError(f"normalize={normalize!r} is not one of {SCHEMES}, a dict of "
                             "statistics ({'mean': m, 'std': s, 'clip': (lo, hi)}) or a "
                             "pointwise callable", parameter='normalize')
        return zscore(arr) if normalize == "zscore" else percentile(arr, PERCENTILES)
    if isinstance(normalize, dict):
        return _from_dict(normalize, arr, channels)
    if callable(normalize):
        return checked_pointwise(normalize, arr)
    raise InputError(f"normalize={normalize!r} is not 'zscore', 'percentile', a dict of "
                     "statistics or a callable", parameter='normalize')


def _from_dict(spec: dict, arr: da.Array, channels: int):
    if set(spec) == {"percentiles"}:
        lo, hi = _pair(spec["percentiles"], "percentiles")
        if not 0 <= lo < hi <= 100:
            raise InputError(f"normalize percentiles {spec['percentiles']!r} must satisfy "
                             "0 <= lo < hi <= 100", parameter='normalize')
        return percentile(arr, (lo, hi))
    unknown = set(spec) - {"mean", "std", "clip"}
    if unknown or not {"mean", "std"} <= set(spec):
        raise InputError(f"normalize={spec!r}: give 'mean' and 'std' (and optionally 'clip': "
                         "(lo, hi)), or only 'percentiles': (lo, hi)", parameter='normalize')
    mean = _per_channel(spec["mean"], channels, "mean")
    std = _per_channel(spec["std"], channels, "std")
    if any(s <= 0 for s in std):
        raise InputError(f"normalize std={spec['std']!r} must be > 0", parameter='normalize')
    clip = None
    if spec.get("clip") is not None:
        lo, hi = _pair(spec["clip"], "clip")
        if not lo < hi:
            raise InputError(f"normalize clip={spec['clip']!r} needs lo < hi", parameter='normalize')
        clip = ((lo, hi),) * channels
    return Normalization(mean, std, clip, scheme="given")


def _pair(value, what: str) -> tuple:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"normalize {what}={value!r} is not a pair of numbers (lo, hi)", parameter='normalize') \
            from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"normalize {what}={value!r} must be finite", parameter='normalize')
    return lo, hi


def _per_channel(value, channels: int, what: str) -> tuple:
    values = [value] * channels if isinstance(value, numbers.Real) else list(value)
    if len(values) != channels or not all(
            isinstance(v, numbers.Real) and np.isfinite(v) for v in values):
        raise InputError(f"normalize {what}={value!r} must be one finite number or one per "
                         f"channel ({channels})", parameter='normalize')
    return tuple(float(v) for v in values)


def zscore(arr: da.Array) -> Normalization:
    """Mean and population std of each channel of the whole volume (float64 sums)."""
    x = arr.astype(np.float64)
    mean, std = dask.compute(x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)))
    return Normalization(tuple(map(float, mean)), _checked_std(std, "the volume"), None,
                         scheme="zscore")


def percentile(arr: da.Array, q: tuple) -> Normalization:
    """Clip each channel to its percentiles ``q`` of the whole volume, then z-score the
    clipped volume."""
    lows, highs = dask.compute(arr.min(axis=(1, 2, 3)), arr.max(axis=(1, 2, 3)))
    _check_finite_range(lows, highs)
    bins = [_bins(arr.dtype, float(lo), float(hi)) for lo, hi in zip(lows, highs)]
    histograms = [da.histogram(arr[c], bins=b, range=span) for c, (b, span, _) in
                  enumerate(bins)]
    counts = dask.compute(*(h for h, _ in histograms))  # one pass for every channel
    clip = [tuple(float(percentile_of_histogram(n, edges, p, integral)) for p in q)
            for n, (_, edges), (_, _, integral) in zip(counts, histograms, bins)]
    lo = np.array([c[0] for c in clip]).reshape(-1, 1, 1, 1)
    hi = np.array([c[1] for c in clip]).reshape(-1, 1, 1, 1)
    x = da.clip(arr.astype(np.float64), lo, hi)
    mean, std = dask.compute(x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)))
    return Normalization(tuple(map(float, mean)), _checked_std(std, "the clipped volume"),
                         tuple(clip), scheme="percentile", percentiles=tuple(map(float, q)))


def _bins(dtype, lo: float, hi: float):
    """Equal histogram bins over [lo, hi] (numpy's fast path): one bin per value for
    integers with a range of at most 2^20 values (exact percentiles), else
    HISTOGRAM_BINS of them."""
    if (np.issubdtype(dtype, np.integer) and hi - lo < 2**20) or hi == lo:
        return int(hi - lo) + 1, (lo - 0.5, hi + 0.5), True
    return HISTOGRAM_BINS, (lo, hi), False


def percentile_of_histogram(counts, edges, q: float, integral: bool) -> float:
    """numpy's linear-interpolation percentile, from a histogram: the k-th smallest
    value is its bin's centre (exact when every bin holds one value) or, for floating
    point bins, placed evenly among the bin's values."""
    counts = np.asarray(counts, np.int64)
    cum = np.cumsum(counts)
    n = int(cum[-1])
    pos = q / 100 * (n - 1)
    k = int(np.floor(pos))

    def kth(k):
        b = int(np.searchsorted(cum, k, side="right"))
        if integral:
            return (edges[b] + edges[b + 1]) / 2
        before = cum[b] - counts[b]
        return edges[b] + (edges[b + 1] - edges[b]) * (k - before + 0.5) / counts[b]
    lo = kth(k)
    return lo if k + 1 >= n else lo + (pos - k) * (kth(k + 1) - lo)


def _check_finite_range(lows, highs) -> None:
    bad = [c for c, (lo, hi) in enumerate(zip(lows, highs))
           if not (np.isfinite(lo) and np.isfinite(hi))]
    if bad:
        raise InputError(f"normalize: channel {bad[0]} of the volume holds NaN or Inf; fill or "
                         "mask non-finite values (np.nan_to_num) before predicting", parameter='normalize')


def _checked_std(std, what: str) -> tuple:
    std = tuple(float(s) for s in std)
    if not all(np.isfinite(std)):
        raise InputError(f"normalize: {what} holds NaN or Inf; fill or mask non-finite "
                         "values (np.nan_to_num) before predicting", parameter='normalize')
    flat = [c for c, s in enumerate(std) if not s > 0]
    if flat:
        raise InputError(f"normalize: channel {flat[0]} of {what} is constant (std 0); "
                         "z-scoring it would divide by zero: pass given statistics "
                         "(normalize={'mean': m, 'std': s})", parameter='normalize')
    return std


PROBE = 24


def checked_pointwise(fn, arr: da.Array) -> Pointwise:
    """``fn`` when it maps a probe region of the volume the same way whole and in
    pieces (so that it is the same transform for any chunking); refused otherwise."""
    for at in ("corner", "centre"):  # a corner may be constant (air, padding)
        start = [0 if at == "corner" else max(0, (n - PROBE) // 2) for n in arr.shape[1:]]
        probe = np.asarray(arr[(slice(None),) + tuple(
            slice(a, min(n, a + PROBE)) for a, n in zip(start, arr.shape[1:]))].compute(),
            np.float32)
        _check_pointwise(fn, probe)
    return Pointwise(fn)


def _check_pointwise(fn, probe: np.ndarray) -> None:
    whole = np.asarray(fn(probe))
    if whole.shape != probe.shape:
        raise InputError(f"normalize={fn!r} changed a block's shape {probe.shape} to "
                         f"{whole.shape}; it must map values one to one", parameter='normalize')
    for axis in (1, 2, 3):
        half = probe.shape[axis] // 2
        if half == 0:
            continue
        parts = np.split(probe, [half], axis=axis)
        pieces = np.concatenate([np.asarray(fn(p)) for p in parts], axis=axis)
        if not np.allclose(pieces, whole, rtol=1e-6, atol=1e-6 * float(np.abs(whole).max())):
            raise InputError(f"normalize={fn!r} is not pointwise: applied to halves of a block "
                             "it gives other values than applied to the whole (statistics of "
                             "each chunk?); pass 'zscore', 'percentile' or given statistics, "
                             "which are computed over the whole volume", parameter='normalize')
