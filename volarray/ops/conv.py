"""Convolutions: Conv3d and ConvTranspose3d of any kernel, stride, dilation, padding and
groups, their tile kernels, and one builder per op for the module and functional forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from ..geometry import Interval
from ..graph import Graph, Node
from .base import LocalOp, call_arg, resolve, triple, window
from .fill import ZEROS, Fill, fill_for
from .pointwise import Pointwise


# ---------------------------------------------------------------- kernels
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
        return (window(out, self.kernel[axis], self.stride[axis], self.dilation[axis],
                       self.pad_lo[axis]),)

    @property
    def native_padding(self) -> bool:
        """Zero padding the kernel can apply itself (faster than a padded copy)."""
        return self.fill == ZEROS

    takes_relu = True

    def run(self, ctx, inputs, out, padding=(0, 0, 0), relu=False):
        w, b = resolve((self.weight, self.bias), ctx)
        return self.convolve(inputs[0], w, b, padding, relu)

    def convolve(self, x, w, b, padding, relu=False):
        if x.dtype != w.dtype:  # the model's own cast (x.float()) in a half-precision run
            x = x.to(w.dtype)
        if use_onednn(x):
            # F.conv3d sends inputs with N*C*D*H <= 20480 (small tiles of thin layers)
            # to a naive kernel ~10x slower than oneDNN; call oneDNN directly.
            if relu and FUSED_CONV is not None:  # the ReLU in oneDNN's kernel: one pass less
                return FUSED_CONV(x, w, b, list(padding), list(self.stride),
                                  list(self.dilation), self.groups, "relu", [], "")
            y = torch.mkldnn_convolution(x, w, b, padding, self.stride, self.dilation,
                                         self.groups)
        else:
            y = F.conv3d(x, w, b, self.stride, padding, self.dilation, self.groups)
        return y.relu_() if relu else y  # a fresh tensor: in place is safe


# oneDNN's convolution with a fused pointwise post-op (what torch.compile's CPU
# backend calls); absent from builds without oneDNN
FUSED_CONV = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def use_onednn(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")  # F.conv3d applies autocast
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


@dataclass
class ArgmaxConv(Conv):
    """A classifier conv fused with argmax over its classes: classes are computed in
    blocks with a running maximum, so a 1000-class head never holds more than
    ``block`` class scores per voxel. Returns labels as float32 (exact below 2^24)."""

    block: int = 32
    classes: int = 1
    takes_relu = False  # its output is labels

    def run(self, ctx, inputs, out, padding=(0, 0, 0)):
        w, b = resolve((self.weight, self.bias), ctx)
        best = labels = None
        for start in range(0, self.classes, self.block):
            stop = min(start + self.block, self.classes)
            scores = self.convolve(inputs[0], w[start:stop],
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

    def span(self, axis, out):
        k, s, d, p = self.kernel[axis], self.stride[axis], self.dilation[axis], self.padding[axis]
        lo = (out.lo + p - d * (k - 1)) // s
        hi = -(-(out.hi - 1 + p) // s) + 1
        return Interval(lo, hi)

    def need(self, axis, out):
        return (self.span(axis, out),)

    def run(self, ctx, inputs, out):
        w, b = resolve((self.weight, self.bias), ctx)
        y = F.conv_transpose3d(inputs[0], w, b, self.stride, 0, 0, self.groups, self.dilation)
        crop = []
        for axis, iv in enumerate(out.axes):
            first = self.span(axis, iv).lo * self.stride[axis] - self.padding[axis]
            crop.append(slice(iv.lo - first, iv.hi - first))
        return y[(slice(None), slice(None)) + tuple(crop)]


# ---------------------------------------------------------------- builders
def pad_lo(padding, kernel, dilation) -> tuple[int, int, int]:
    """The padding before each axis: a number per axis, "same" or "valid"."""
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    if padding == "valid":
        return (0, 0, 0)
    return triple(padding)


def conv(ctx, weight, bias, kernel, stride, dilation, padding, groups, fill=ZEROS) -> Conv:
    """A Conv3d from its hyper-parameters (weight and bias: markers or None)."""
    kernel, stride, dilation = triple(kernel), triple(stride), triple(dilation)
    return Conv(weight=weight, bias=bias, kernel=kernel, stride=stride, dilation=dilation,
                pad_lo=pad_lo(padding, kernel, dilation), groups=groups, fill=fill,
                macs=ctx.c_out * ctx.c_in / groups * math.prod(kernel))


def conv_module(ctx) -> Conv:
    """nn.Conv3d (its padding_mode is the fill)."""
    m = ctx.module
    ctx.template()
    return conv(ctx, ctx.attr("weight"), ctx.attr("bias") if m.bias is not None else None,
                m.kernel_size, m.stride, m.dilation, m.padding, m.groups,
                fill_for(m.padding_mode))


def conv_function(ctx) -> Conv:
    """F.conv3d(input, weight, bias, stride, padding, dilation, groups)."""
    args, kwargs = ctx.template()
    kernel = tuple(ctx.meta(ctx.arg(1, "weight")).shape[2:])
    return conv(ctx, call_arg(args, kwargs, 1, "weight"), call_arg(args, kwargs, 2, "bias"),
                kernel, ctx.param(3, "stride", 1), ctx.param(5, "dilation", 1),
                ctx.param(4, "padding", 0), ctx.param(6, "groups", 1))


def conv_transpose(ctx, weight, bias, kernel, stride, dilation, padding, groups):
    """A ConvTranspose3d from its hyper-parameters (output_padding only sets the
    output's shape, which the trace knows)."""
    kernel, stride = triple(kernel), triple(stride)
    return ConvTranspose(weight=weight, bias=bias, kernel=kernel, stride=stride,
                         dilation=triple(dilation), padding=triple(padding), groups=groups,
                         macs=ctx.c_out * ctx.c_in / groups * math.prod(kernel)
                         / math.prod(stride))


def conv_transpose_module(ctx) -> ConvTranspose:
    """nn.ConvTranspose3d, zero padded, called without output_size."""
    m = ctx.module
    if m.padding_mode != "zeros":
        ctx.unsupported(f"padding_mode={m.padding_mode!r}")
    ctx.template()
    if len(ctx.node.args) > 1 or ctx.node.kwargs:
        ctx.unsupported("it is called with output_size")
    return conv_transpose(ctx, ctx.attr("weight"),
                          ctx.attr("bias") if m.bias is not None else None, m.kernel_size,
                          m.stride, m.dilation, m.padding, m.groups)


def conv_transpose_function(ctx) -> ConvTranspose:
    """F.conv_transpose3d(input, weight, bias, stride, padding, output_padding, groups,
    dilation)."""
    args, kwargs = ctx.template()
    kernel = tuple(ctx.meta(ctx.arg(1, "weight")).shape[2:])
    return conv_transpose(ctx, call_arg(args, kwargs, 1, "weight"),
                          call_arg(args, kwargs, 2, "bias"), kernel,
                          ctx.param(3, "stride", 1), ctx.param(7, "dilation", 1),
                          ctx.param(4, "padding", 0), ctx.param(6, "groups", 1))


# ---------------------------------------------------------------- the argmax head
def fuse_argmax_head(graph: Graph, block: int = 32) -> Graph | None:
    """``graph`` with its classifier conv and the monotone ops after it (sigmoid,
    softmax) replaced by one `ArgmaxConv` computing the argmax in class blocks: a new
    graph (graphs are frozen). None if the head is not of that form."""
    consumers, nodes = graph.consumers(), graph.nodes
    name, chain = graph.output, []
    while isinstance(nodes[name].op, Pointwise) and nodes[name].op.monotone:
        chain.append(name)
        name = nodes[name].inputs[0] if nodes[name].inputs else None
        if name is None or len(consumers[name]) != 1 or len(nodes[chain[-1]].inputs) != 1:
            return None
    conv = nodes[name]
    op = conv.op
    if type(op) is not Conv or op.groups != 1:
        return None
    fused = ArgmaxConv(weight=op.weight, bias=op.bias, kernel=op.kernel, stride=op.stride,
                       dilation=op.dilation, pad_lo=op.pad_lo, groups=op.groups, fill=op.fill,
                       macs=op.macs, block=block, classes=conv.channels,
                       scratch_channels=min(block, conv.channels) * 2)
    head = f"{name}_argmax"
    kept = {n: node for n, node in nodes.items() if n not in chain and n != name}
    kept[head] = Node(head, fused, conv.inputs, conv.shape, 1, conv.scale,
                      conv.where + " fused with argmax")
    return replace(graph, nodes=kept, output=head)
