"""Exact tile kernels for local ops.

Each op answers two questions: which region of each spatial input does an
output region need (per axis, with the border mode it reads past the volume
with), and how to compute exactly that output region from those inputs. Ops are
computed unpadded ("valid") on inputs that the executor has already extended by
the layer's own padding semantics, so a tile equals the whole-volume result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Box, Interval
from .fill import INSIDE, NEG_INF, ZEROS, Fill


@dataclass(frozen=True)
class Attr:
    """A parameter or buffer of the traced model, resolved on the worker."""

    path: str


@dataclass(frozen=True)
class SpatialArg:
    """Placeholder for the i-th spatial input of a node inside its call arguments."""

    index: int


def resolve(obj, ctx, inputs=()):
    """Replace Attr / SpatialArg / GlobalArg markers inside nested call arguments."""
    if isinstance(obj, SpatialArg):
        return inputs[obj.index]
    if isinstance(obj, Attr):
        return ctx.attr(obj.path)
    if type(obj).__name__ == "GlobalArg":
        return ctx.global_value(obj.name)
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(o, ctx, inputs) for o in obj)
    if isinstance(obj, dict):
        return {k: resolve(v, ctx, inputs) for k, v in obj.items()}
    return obj


def _triple(v) -> tuple[int, int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return (int(v[0]),) * 3
        return tuple(int(i) for i in v)
    return (int(v),) * 3


@dataclass
class LocalOp:
    """Base: one output tensor, ``n_inputs`` spatial inputs."""

    n_inputs: int = 1
    fills: tuple[Fill, ...] = ()
    scale: tuple[Fraction, Fraction, Fraction] = (Fraction(1),) * 3  # output/input grid ratio
    macs: float = 1.0  # multiply-adds per output voxel (all channels), for cost estimates
    scratch_channels: int = 0  # temporaries per output voxel beyond the output, for memory

    def need(self, axis: int, out: Interval) -> tuple[Interval, ...]:
        raise NotImplementedError

    def run(self, ctx, inputs: list[torch.Tensor], out: Box) -> torch.Tensor:
        raise NotImplementedError

    @property
    def changes_resolution(self) -> bool:
        return any(s != 1 for s in self.scale)

    @property
    def globals(self) -> tuple[str, ...]:
        """Whole-volume values (norm statistics, pooled vectors) the op reads."""
        return _global_names((getattr(self, "args", ()), getattr(self, "kwargs", {})))


def _global_names(obj) -> tuple[str, ...]:
    if type(obj).__name__ == "GlobalArg":
        return (obj.name,)
    if isinstance(obj, (list, tuple)):
        return tuple(n for o in obj for n in _global_names(o))
    if isinstance(obj, dict):
        return _global_names(tuple(obj.values()))
    return ()


@dataclass
class Pointwise(LocalOp):
    """Any op whose output voxel depends only on the same voxel of its inputs
    (activations, eval norms, add/mul, cat and softmax over channels)."""

    call: Callable | None = None  # called as call(ctx, *args, **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    monotone: bool = False  # increasing per channel (sigmoid, softmax over channels, ...)

    def __post_init__(self):
        self.fills = (INSIDE,) * self.n_inputs

    def need(self, axis, out):
        return (out,) * self.n_inputs

    def run(self, ctx, inputs, out):
        return self.call(ctx, *resolve(self.args, ctx, inputs), **resolve(self.kwargs, ctx, inputs))


def _window(out: Interval, k: int, s: int, d: int, p: int) -> Interval:
    """Input positions read by a sliding window (conv, pooling) over ``out``."""
    return Interval(out.lo * s - p, (out.hi - 1) * s - p + d * (k - 1) + 1)


@dataclass
class Conv(LocalOp):
    """Conv3d of any kernel, stride, dilation, groups, padding and padding mode."""

    weight: Any = None
    bias: Any = None
    kernel: tuple = (1, 1, 1)
    stride: tuple = (1, 1, 1)
    dilation: tuple = (1, 1, 1)
    pad_lo: tuple = (0, 0, 0)
    groups: int = 1
    fill: Fill = ZEROS

    def __post_init__(self):
        self.fills = (self.fill,)
        self.scale = tuple(Fraction(1, s) for s in self.stride)

    def need(self, axis, out):
        return (_window(out, self.kernel[axis], self.stride[axis], self.dilation[axis],
                        self.pad_lo[axis]),)

    @property
    def native_padding(self) -> bool:
        """Zero padding the kernel can apply itself (faster than a padded copy)."""
        return self.fill == ZEROS

    def run(self, ctx, inputs, out, padding=(0, 0, 0)):
        w, b = resolve((self.weight, self.bias), ctx)
        return self._conv(inputs[0], w, b, padding)

    def _conv(self, x, w, b, padding):
        if _use_onednn(x):
            # F.conv3d sends inputs with N*C*D*H <= 20480 (small tiles of thin layers)
            # to a naive kernel ~10x slower than oneDNN; call oneDNN directly.
            return torch.mkldnn_convolution(x, w, b, padding, self.stride, self.dilation,
                                            self.groups)
        return F.conv3d(x, w, b, self.stride, padding, self.dilation, self.groups)


def _use_onednn(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")  # F.conv3d applies autocast
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


@dataclass
class ConvTranspose(LocalOp):
    """ConvTranspose3d: input outside the volume contributes nothing (zeros)."""

    weight: Any = None
    bias: Any = None
    kernel: tuple = (1, 1, 1)
    stride: tuple = (1, 1, 1)
    dilation: tuple = (1, 1, 1)
    padding: tuple = (0, 0, 0)
    groups: int = 1

    def __post_init__(self):
        self.fills = (ZEROS,)
        self.scale = tuple(Fraction(s) for s in self.stride)

    def _span(self, axis, out):
        k, s, d, p = self.kernel[axis], self.stride[axis], self.dilation[axis], self.padding[axis]
        lo = (out.lo + p - d * (k - 1)) // s
        hi = -(-(out.hi - 1 + p) // s) + 1
        return Interval(lo, hi)

    def need(self, axis, out):
        return (self._span(axis, out),)

    def run(self, ctx, inputs, out):
        w, b = resolve((self.weight, self.bias), ctx)
        y = F.conv_transpose3d(inputs[0], w, b, self.stride, 0, 0, self.groups, self.dilation)
        crop = []
        for axis, iv in enumerate(out.axes):
            first = self._span(axis, iv).lo * self.stride[axis] - self.padding[axis]
            crop.append(slice(iv.lo - first, iv.hi - first))
        return y[(slice(None), slice(None)) + tuple(crop)]


@dataclass
class Pool(LocalOp):
    """MaxPool3d / AvgPool3d with padding, dilation (max) and ceil_mode."""

    kind: str = "max"
    kernel: tuple = (2, 2, 2)
    stride: tuple = (2, 2, 2)
    dilation: tuple = (1, 1, 1)
    padding: tuple = (0, 0, 0)
    count_include_pad: bool = True
    divisor_override: int | None = None
    in_shape: tuple = (0, 0, 0)

    def __post_init__(self):
        self.fills = (NEG_INF if self.kind == "max" else ZEROS,)
        self.scale = tuple(Fraction(1, s) for s in self.stride)

    def need(self, axis, out):
        return (_window(out, self.kernel[axis], self.stride[axis], self.dilation[axis],
                        self.padding[axis]),)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        if self.kind == "max":
            return F.max_pool3d(x, self.kernel, self.stride, 0, self.dilation)
        mean = F.avg_pool3d(x, self.kernel, self.stride, 0)
        if self.divisor_override:
            return mean * (math.prod(self.kernel) / self.divisor_override)
        # Divide by the count of voxels the whole-volume layer counts (see PyTorch's
        # avg_pool3d): the padded extent, or only the true volume.
        masks = []
        for axis, iv in enumerate(out.axes):
            (src,) = self.need(axis, iv)
            idx = np.arange(src.lo, src.hi)
            p = self.padding[axis] if self.count_include_pad else 0
            masks.append(((idx >= -p) & (idx < self.in_shape[axis] + p)).astype(np.float32))
        mask = torch.as_tensor(np.einsum("i,j,k->ijk", *masks), device=x.device, dtype=x.dtype)
        return mean / F.avg_pool3d(mask[None, None], self.kernel, self.stride, 0)


def _scale_value(scale: float | None, n_in: int, n_out: int) -> np.float32:
    # PyTorch's compute_scales_value: 1/scale_factor if given, else in/out, as float32
    if scale is not None and scale > 0:
        return np.float32(1.0 / scale)
    return np.float32(n_in) / np.float32(n_out)


def resample_indices(mode: str, n_in: int, n_out: int, scale: float | None,
                     align_corners: bool | None):
    """Per-output-voxel source indices (and linear weights) exactly as PyTorch's
    CPU upsampling kernels compute them, in float32, over the whole axis."""
    o = np.arange(n_out)
    if n_in == n_out:
        return o, o, np.zeros(n_out, np.float32)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == 2 * n_in:
            idx = o >> 1
        else:
            s = _scale_value(scale, n_in, n_out)
            off = np.float32(0.5) if mode == "nearest-exact" else np.float32(0.0)
            idx = np.minimum(np.floor((o.astype(np.float32) + off) * s).astype(np.int64), n_in - 1)
        return idx, idx, np.zeros(n_out, np.float32)
    if align_corners:
        s = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        real = s * o.astype(np.float32)
    else:
        s = _scale_value(scale, n_in, n_out)
        real = s * (o.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
        real = np.where(real < 0, np.float32(0), real).astype(np.float32)
    i0 = real.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    lam = np.clip(real - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, lam


@dataclass
class Resample(LocalOp):
    """Nearest / trilinear interpolation by global source coordinates, so tiles
    reproduce the whole-volume index mapping, edge clamping and align_corners."""

    mode: str = "nearest"
    tables: tuple = ()  # per axis: (i0, i1, lambda1) over the whole output axis
    # Integer factors per axis when F.interpolate on a tile reproduces the whole-volume
    # mapping (same scale, no align_corners): then the fast native kernel is used.
    factors: tuple | None = None
    align_corners: bool | None = None

    def __post_init__(self):
        self.fills = (INSIDE,)

    def need(self, axis, out):
        i0, i1, _ = self.tables[axis]
        if out.empty:
            return (out,)
        return (Interval(int(i0[out.lo:out.hi].min()), int(i1[out.lo:out.hi].max()) + 1),)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        if self.factors is not None:
            mode = "trilinear" if self.mode == "linear" else self.mode
            y = F.interpolate(x, scale_factor=self.factors, mode=mode,
                              align_corners=self.align_corners if mode == "trilinear" else None)
            crop = []
            for axis, (iv, f) in enumerate(zip(out.axes, self.factors)):
                first = self.need(axis, iv)[0].lo * int(f)
                crop.append(slice(iv.lo - first, iv.hi - first))
            crop = tuple(crop)
            return y[(slice(None), slice(None)) + crop]
        for axis, iv in enumerate(out.axes):
            i0, i1, lam = (a[iv.lo:iv.hi] for a in self.tables[axis])
            base = self.need(axis, iv)[0].lo
            dim = axis + 2
            if (x.shape[dim] == len(iv) and not lam.any()
                    and np.array_equal(i0, np.arange(base, base + len(iv)))):
                continue  # identity along this axis
            x0 = x.index_select(dim, torch.as_tensor(i0 - base, device=x.device))
            if self.mode.startswith("nearest"):
                x = x0
                continue
            x1 = x.index_select(dim, torch.as_tensor(i1 - base, device=x.device))
            shape = [1] * x.dim()
            shape[dim] = len(iv)
            w1 = torch.as_tensor(lam, device=x.device, dtype=x.dtype).reshape(shape)
            x = x0 * (1 - w1) + x1 * w1
        return x


@dataclass
class Pad(LocalOp):
    """F.pad / nn.*Pad3d over the spatial axes (negative pads crop)."""

    pad_lo: tuple = (0, 0, 0)
    fill: Fill = ZEROS

    def __post_init__(self):
        self.fills = (self.fill,)

    def need(self, axis, out):
        p = self.pad_lo[axis]
        return (Interval(out.lo - p, out.hi - p),)

    def run(self, ctx, inputs, out):
        return inputs[0]


_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping products, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


@dataclass
class PositionalDropout(LocalOp):
    """Dropout left active (MC dropout), with masks drawn from a hash of the sample
    seed, the layer and the voxel's global position: every chunking, tile and
    scheduler draws the same mask, so samples are reproducible and seam-free."""

    p: float = 0.5
    channelwise: bool = False  # Dropout3d: one draw per channel
    layer: int = 0
    full_shape: tuple = (1, 1, 1)

    def __post_init__(self):
        self.fills = (INSIDE,)

    def need(self, axis, out):
        return (out,)

    def run(self, ctx, inputs, out):
        x = inputs[0]
        c = x.shape[1]
        key = int(_mix(torch.tensor(_signed(getattr(ctx, "seed", 0) * 1_000_003 + self.layer))))
        idx = torch.arange(c, dtype=torch.int64, device=x.device).reshape(1, c, 1, 1, 1)
        if not self.channelwise:
            for axis, iv in enumerate(out.axes):
                shape = [1, 1, 1, 1, 1]
                shape[axis + 2] = len(iv)
                coord = torch.arange(iv.lo, iv.hi, dtype=torch.int64, device=x.device)
                idx = idx * self.full_shape[axis] + coord.reshape(shape)
        u = ((_mix(idx ^ key) >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
        keep = (u >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


@dataclass
class ArgmaxConv(Conv):
    """A classifier conv fused with argmax over its classes: classes are computed in
    blocks with a running maximum, so a 1000-class head never holds more than
    ``block`` class scores per voxel. Returns labels as float32 (exact below 2^24)."""

    block: int = 32
    classes: int = 1

    def run(self, ctx, inputs, out, padding=(0, 0, 0)):
        w, b = resolve((self.weight, self.bias), ctx)
        best = labels = None
        for start in range(0, self.classes, self.block):
            stop = min(start + self.block, self.classes)
            scores = super()._conv(inputs[0], w[start:stop],
                                   None if b is None else b[start:stop], padding)
            top, idx = scores.max(dim=1, keepdim=True)
            idx = (idx + start).to(scores.dtype)
            if best is None:
                best, labels = top, idx
            else:
                better = top > best  # ties keep the first class, as torch.argmax does
                best = torch.where(better, top, best)
                labels = torch.where(better, idx, labels)
        return labels
