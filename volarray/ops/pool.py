"""Max and average pooling (padding, dilation, ceil_mode, count_include_pad,
divisor_override): the tile kernel and one builder for module and functional forms."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from .base import LocalOp, triple, window
from .fill import NEG_INF, ZEROS


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
        return (window(out, self.kernel[axis], self.stride[axis], self.dilation[axis],
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


# per byte of output at kernel 2 (8 inputs read), channels last, against a ReLU's: max
# 4.2-4.5, avg 35-49 (`benchmarks/results/op_rates.md`); scaled by the kernel's voxels
POOL_PASSES = {"max": 4.3, "avg": 40.0}


def pool(ctx, kind, kernel, stride, padding, dilation=1, count_include_pad=True,
         divisor_override=None, return_indices=False) -> Pool:
    """A pooling op from its hyper-parameters (ceil_mode only sets the output's shape,
    which the trace knows). ``stride`` None or empty: the kernel."""
    if return_indices:
        ctx.unsupported("return_indices=True")
    ctx.template()
    kernel = triple(kernel)
    return Pool(kind=kind, kernel=kernel, stride=triple(stride or kernel),
                dilation=triple(dilation), padding=triple(padding),
                count_include_pad=count_include_pad, divisor_override=divisor_override,
                in_shape=ctx.in_shape, macs=float(math.prod(kernel)),
                memory_passes=POOL_PASSES[kind] * math.prod(kernel) / 8)


def max_pool_module(ctx) -> Pool:
    m = ctx.module
    return pool(ctx, "max", m.kernel_size, m.stride, m.padding, m.dilation,
                return_indices=m.return_indices)


def avg_pool_module(ctx) -> Pool:
    m = ctx.module
    return pool(ctx, "avg", m.kernel_size, m.stride, m.padding,
                count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)


def given(ctx, i: int, name: str, default=None):
    """A functional pooling argument; None, as if not passed, is the default."""
    value = ctx.param(i, name)
    return default if value is None else value


def max_pool_function(ctx) -> Pool:
    """F.max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode,
    return_indices)."""
    return pool(ctx, "max", given(ctx, 1, "kernel_size"), given(ctx, 2, "stride"),
                given(ctx, 3, "padding", 0), given(ctx, 4, "dilation", 1),
                return_indices=given(ctx, 6, "return_indices", False))


def avg_pool_function(ctx) -> Pool:
    """F.avg_pool3d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override)."""
    return pool(ctx, "avg", given(ctx, 1, "kernel_size"), given(ctx, 2, "stride"),
                given(ctx, 3, "padding", 0),
                count_include_pad=given(ctx, 5, "count_include_pad", True),
                divisor_override=given(ctx, 6, "divisor_override"))
