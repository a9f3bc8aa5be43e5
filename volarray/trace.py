"""Capture a model and give every op its spatial signature.

The capture is torch.export's (`volarray.capture`), lowered to torch functions; torch.fx's
where export cannot capture the model. The result is a `Graph`: spatial nodes in
topological order, each with the whole-volume shape of its output and a tile kernel
from `volarray.ops`. Whole-volume shapes come from running the captured graph on fake
tensors, so tracing a 4096^3 volume costs nothing.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import operator
import os
import re
import traceback
import warnings
import weakref
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .capture import AtenCall, export_graph, innermost_module
from .errors import InputError, TraceError, UnsupportedOpError
from .geometry import nominal_scale
from .layout import ChannelsLastBlock, fuse_channels_last
from .selfcheck import check_capture
from .ops.fill import ZEROS, Fill
from .ops.local import (ArgmaxConv, Attr, Conv, ConvTranspose, LocalOp, Pad, Pointwise, Pool,
                        PositionalDropout, Resample, SpatialArg, _triple, resample_indices)
from .ops.reduce import Broadcast, GlobalArg, GlobalNode, NormApply


@dataclass
class Node:
    name: str
    op: LocalOp | None  # None for the input placeholder
    inputs: tuple[str, ...]  # spatial producers, in the op's argument order
    shape: tuple[int, int, int]  # whole-volume spatial shape of this node's output
    channels: int
    scale: tuple[Fraction, Fraction, Fraction]  # grid ratio to the model input
    where: str  # module path / call, for messages

    @property
    def floats_per_input_voxel(self) -> float:
        return self.channels * float(self.scale[0] * self.scale[1] * self.scale[2])


@dataclass
class Graph:
    gm: fx.GraphModule
    nodes: dict[str, Node]  # spatial nodes, topological order; the first is the input
    input: str
    output: str
    dtype: torch.dtype
    globals: dict[str, GlobalNode] = None  # whole-volume values, topological order

    def consumers(self) -> dict[str, list[str]]:
        out = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for p in node.inputs:
                out[p].append(node.name)
        return out


# ---------------------------------------------------------------- op table
_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.PReLU, nn.LogSigmoid, nn.Tanhshrink, nn.Identity, nn.Threshold,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout3d, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.neg, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.sqrt,
    torch.rsqrt, torch.square, torch.pow, torch.clamp, torch.clip, torch.maximum, torch.minimum,
    torch.where, torch.sin, torch.cos, torch.erf, torch.log1p, torch.expm1, torch.reciprocal,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.logsigmoid,
    F.prelu, F.threshold,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "exp", "log", "abs", "sqrt",
    "pow", "clamp", "clip", "contiguous", "clone", "float", "square", "__add__", "__mul__",
    "__sub__", "__truediv__", "__radd__", "__rmul__", "add_", "mul_", "relu_", "sigmoid_",
}
_CHANNEL_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate, torch.softmax, F.softmax,
                      torch.log_softmax, F.log_softmax}
aten = torch.ops.aten
# ATen ops that pass values through (copies, dtype casts): placed as per-voxel ops
_ATEN_IDENTITY = {aten.clone.default, aten.contiguous.default, aten.alias.default,
                  aten.detach.default, aten.to.dtype, aten._to_copy.default,
                  aten.lift_fresh_copy.default}
_FILL_BY_PAD_MODE = {"zeros": ZEROS, "constant": ZEROS, "reflect": Fill("reflect"),
                     "replicate": Fill("replicate"), "circular": Fill("circular")}


# Ops never write into their inputs here: a tile's input may be a view of rows that a
# swept task keeps for its next slab (the whole-volume forward ran its readers first).
def _call_module(target):
    def call(ctx, *a, **k):
        module = ctx.module(target)
        if getattr(module, "inplace", False) and a and isinstance(a[0], torch.Tensor):
            a = (a[0].clone(),) + a[1:]  # nn.ReLU(inplace=True) and kin
        return module(*a, **k)
    return call


def _call_function(fn):
    if isinstance(fn, torch._ops.OpOverload):
        fn = AtenCall(fn)  # OpOverloads do not pickle; workers may be other processes
    return lambda ctx, *a, **k: fn(*a, **{**k, "inplace": False} if k.get("inplace") else k)


def _call_method(name):
    if name.endswith("_") and not name.startswith("__"):
        name = name[:-1]  # x.add_(y) -> x.add(y)
    return lambda ctx, self, *a, **k: getattr(self, name)(*a, **k)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _same_pad(kernel, dilation):
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple(t // 2 for t in total)


def _conv_pad_lo(padding, kernel, dilation):
    if padding == "same":
        return _same_pad(kernel, dilation)
    if padding == "valid":
        return (0, 0, 0)
    return _triple(padding)


_MONOTONE = {"sigmoid", "tanh", "softmax", "log_softmax", "identity", "contiguous",
             "clone", "float", "dropout", "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Identity",
             "Dropout", "Dropout3d"}


def _is_monotone(node: fx.Node, modules) -> bool:
    """Strictly increasing in each channel's score alike: the argmax over channels
    is unchanged by it."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__ in _MONOTONE
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0] in _MONOTONE  # ATen overloads: "sigmoid.default"


class _Builder:
    """Walks the fx graph once, classifying nodes and building their tile ops."""

    def __init__(self, gm: fx.GraphModule, values: dict, input_shape):
        self.gm = gm
        self.values = values  # node name -> meta value (tensors on meta, python values)
        self.modules = dict(gm.named_modules())
        self.nodes: dict[str, Node] = {}
        self.inline: dict[str, object] = {}  # shape-derived python values, inlined as constants
        self.attrs: dict[str, str] = {}  # node name -> attribute path for constant tensors
        self.globals: dict[str, GlobalNode] = {}
        self.input_shape = input_shape

    # -- naming for messages
    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.modules[node.target]).__name__})"
        path, cls = innermost_module(node)
        fn = getattr(node.target, "__name__", str(node.target))
        inside = f", in {path} ({cls})" if path else ""
        return f"{node.op} '{fn}' (node '{node.name}'{inside})"

    def unsupported(self, node, why: str):
        raise UnsupportedOpError(
            f"exact mode cannot place {self.where(node)}: {why}. Rewrite that part of the model "
            "with the supported local ops (see volarray.trace), or run it with a patch-based "
            "sliding window instead of mode='exact'.")

    # -- argument substitution
    def template(self, node: fx.Node, spatial: list[str]):
        def sub(a):
            if a.name in self.nodes:
                if a.name not in spatial:
                    spatial.append(a.name)
                return SpatialArg(spatial.index(a.name))
            if a.name in self.globals:
                return GlobalArg(a.name)
            if a.name in self.inline:
                return self.inline[a.name]
            if a.name in self.attrs:
                return Attr(self.attrs[a.name])
            self.unsupported(node, f"its argument '{a.name}' is neither the volume nor a constant")
        args = fx.node.map_arg(node.args, sub)
        kwargs = fx.node.map_arg(node.kwargs, sub)
        return args, kwargs

    def static(self, node, value, what):
        """A python value for a layer hyper-parameter; constants are resolved."""
        if isinstance(value, fx.Node):
            if value.name in self.inline:
                return self.inline[value.name]
            self.unsupported(node, f"its {what} is computed from tensors")
        return value

    # -- main walk
    def build(self, graph: fx.Graph) -> tuple[str, str]:
        depends: set[str] = set()
        inp = out = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if inp is not None:
                    raise TraceError(
                        f"the model's forward takes more than one tensor argument "
                        f"('{inp}', '{node.name}'); volarray passes only the volume. Wrap the "
                        "model so that forward(x) takes the volume alone.")
                inp = node.name
                depends.add(node.name)
                v = self.values[node.name]
                self.nodes[node.name] = Node(node.name, None, (), tuple(v.shape[2:]), v.shape[1],
                                             (Fraction(1),) * 3, "the input")
                continue
            if node.op == "output":
                res = node.args[0]
                if not isinstance(res, fx.Node) or res.name not in self.nodes:
                    raise UnsupportedOpError(
                        "the model must return one tensor of shape (1, C, Z, Y, X); it returns "
                        f"{res!r}. Wrap the model to return the prediction tensor alone.")
                out = res.name
                continue
            deps = [a.name for a in node.all_input_nodes]
            if not any(d in depends for d in deps):
                self.constant(node)
                continue
            depends.add(node.name)
            value = self.values[node.name]
            if not isinstance(value, torch.Tensor):
                self.inline[node.name] = value  # e.g. x.shape[2:], for F.interpolate(size=...)
                continue
            spatial_deps = [d for d in deps if d in self.nodes]
            if self.reduction(node, value, spatial_deps):
                continue
            if not spatial_deps or self.is_broadcast_of_global(node):
                self.global_value(node, value)
                continue
            if value.dim() != 5:
                self.unsupported(node, f"it returns a tensor of shape {tuple(value.shape)}, "
                                 "not (1, C, Z, Y, X)")
            self.spatial(node, value)
        return inp, out

    # -- whole-volume reductions and values
    def module_of(self, node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def reduction(self, node: fx.Node, value, spatial_deps) -> bool:
        """InstanceNorm / GroupNorm / global mean on a spatial tensor: a barrier."""
        if not spatial_deps:
            return False
        m, fn = self.module_of(node), node.target
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or x.name not in self.nodes:
            return False
        src = self.nodes[x.name]
        c = src.channels
        if isinstance(m, nn.InstanceNorm3d) or fn is F.instance_norm:
            if m is not None and m.track_running_stats and not m.training:
                return False  # running statistics: pointwise, like BatchNorm
            if m is None and not self.static(node, _arg(node, 5, "use_input_stats", True),
                                             "use_input_stats"):
                return False
            eps = m.eps if m is not None else self.static(node, _arg(node, 7, "eps", 1e-5), "eps")
            self.norm(node, value, x.name, c, eps, *self.affine(node, m, 3))
            return True
        if isinstance(m, nn.GroupNorm) or fn is F.group_norm:
            if m is not None:
                groups, eps = m.num_groups, m.eps
            else:
                groups = self.static(node, _arg(node, 1, "num_groups"), "num_groups")
                eps = self.static(node, _arg(node, 4, "eps", 1e-5), "eps")
            self.norm(node, value, x.name, groups, eps, *self.affine(node, m, 2))
            return True
        is_mean = False
        if isinstance(m, nn.AdaptiveAvgPool3d) or fn is F.adaptive_avg_pool3d:
            size = m.output_size if m is not None else self.static(node, _arg(node, 1, "output_size"), "output_size")
            is_mean = _triple(size) == (1, 1, 1)
            if not is_mean:
                size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
                self.unsupported(node, f"adaptive pooling to {size} (only to 1, a global mean, "
                                 "is exact)")
        elif fn is torch.mean or (node.op == "call_method" and node.target == "mean"):
            dims = self.static(node, _arg(node, 1, "dim"), "dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            is_mean = sorted(d % 5 for d in dims) == [2, 3, 4]
        if is_mean:
            self.globals[node.name] = GlobalNode(node.name, "reduce", self.where(node),
                                                 source=x.name, groups=c, output="mean",
                                                 shape=tuple(value.shape))
            return True
        return False

    def affine(self, node, m, weight_index: int):
        """A norm's (weight, bias): module attributes, or the functional's arguments."""
        if m is not None:
            if not m.affine:
                return None, None
            return Attr(f"{node.target}.weight"), Attr(f"{node.target}.bias")
        args, kwargs = self.template(node, [])
        w = args[weight_index] if len(args) > weight_index else kwargs.get("weight")
        b = args[weight_index + 1] if len(args) > weight_index + 1 else kwargs.get("bias")
        return w, b

    def norm(self, node, value, src, groups, eps, w, b):
        stats = f"{node.name}__stats"
        self.globals[stats] = GlobalNode(stats, "reduce", self.where(node), source=src,
                                         groups=groups)
        node_src = self.nodes[src]
        if node_src.channels % groups:
            self.unsupported(node, f"{node_src.channels} channels in {groups} groups")
        op = NormApply(n_inputs=1, stats=stats, groups=groups, eps=float(eps), weight=w, bias=b,
                       macs=4.0 * node_src.channels)
        self.nodes[node.name] = Node(node.name, op, (src,), node_src.shape, value.shape[1],
                                     node_src.scale, self.where(node))

    def is_broadcast_of_global(self, node) -> bool:
        """``g.expand_as(x)``: a global spread to a spatial tensor's shape."""
        return (node.op == "call_method" and node.target == "expand_as"
                and isinstance(node.args[0], fx.Node) and node.args[0].name in self.globals)

    def global_value(self, node: fx.Node, value: torch.Tensor):
        """A node computed from whole-volume values only; if it spreads a pooled
        (1, C, 1, 1, 1) value to a spatial shape, it becomes a tile op."""
        src = next((a.name for a in node.all_input_nodes if a.name in self.globals), None)
        shape = tuple(value.shape[2:]) if value.dim() == 5 else ()
        if value.dim() == 5 and shape != (1, 1, 1) and src is not None:
            g_val = self.values[src]
            if g_val.dim() != 5 or tuple(g_val.shape[2:]) != (1, 1, 1):
                self.unsupported(node, f"it spreads a tensor of shape {tuple(g_val.shape)} "
                                 "over the volume; only (1, C, 1, 1, 1) values spread exactly")
            self.nodes[node.name] = Node(node.name, Broadcast(source=src, macs=0.0), (), shape,
                                         value.shape[1], tuple(nominal_scale(n, n_in) for n, n_in
                                                               in zip(shape, self.input_shape)),
                                         self.where(node))
            return
        args, kwargs = self.template(node, [])
        if node.op == "call_module":
            call = _call_module(node.target)
        elif node.op == "call_method":
            call = _call_method(node.target)
        else:
            call = _call_function(node.target)
        deps = tuple(a.name for a in node.all_input_nodes if a.name in self.globals)
        self.globals[node.name] = GlobalNode(node.name, "eval", self.where(node), call=call,
                                             args=args, kwargs=kwargs, deps=deps,
                                             shape=tuple(value.shape))

    def constant(self, node: fx.Node):
        if node.op == "get_attr":
            self.attrs[node.name] = node.target
            return
        # A computation on parameters only: evaluated on the worker like an attribute.
        self.attrs[node.name] = f"@{node.name}"

    def spatial(self, node: fx.Node, value: torch.Tensor):
        spatial: list[str] = []
        op = self.make_op(node, spatial)
        ins = [self.nodes[s] for s in spatial]
        shape = tuple(value.shape[2:])
        if isinstance(op, Pointwise):
            for s in ins:
                if s.shape != shape:
                    self.unsupported(node, f"it combines a tensor of spatial shape {s.shape} "
                                     f"with one of {shape}; shapes must match")
        scale = tuple(nominal_scale(n, n_in) for n, n_in in zip(shape, self.input_shape))
        self.nodes[node.name] = Node(node.name, op, tuple(spatial), shape, value.shape[1], scale,
                                     self.where(node))

    def make_op(self, node: fx.Node, spatial: list[str]) -> LocalOp:
        first = node.all_input_nodes[0] if node.all_input_nodes else None
        in_val = self.values.get(first.name) if first is not None else None
        out_val = self.values[node.name]
        in_shape = tuple(in_val.shape[2:]) if isinstance(in_val, torch.Tensor) else ()
        out_shape = tuple(out_val.shape[2:])
        c_in = in_val.shape[1] if isinstance(in_val, torch.Tensor) and in_val.dim() == 5 else 1
        c_out = out_val.shape[1]

        def pointwise(call, macs=1.0):
            args, kwargs = self.template(node, spatial)
            return Pointwise(n_inputs=len(spatial), call=call, args=args, kwargs=kwargs,
                             macs=macs * c_out, monotone=_is_monotone(node, self.modules))

        def channel_dim_only(dim):
            dim = self.static(node, dim, "dim")
            if dim not in (1, -4):
                self.unsupported(node, f"it acts along dim={dim}; only the channel dim (1) is "
                                 "local")

        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv3d):
                self.template(node, spatial)
                return Conv(weight=Attr(f"{node.target}.weight"),
                            bias=Attr(f"{node.target}.bias") if m.bias is not None else None,
                            kernel=m.kernel_size, stride=m.stride, dilation=m.dilation,
                            pad_lo=_conv_pad_lo(m.padding, m.kernel_size, m.dilation),
                            groups=m.groups, fill=_FILL_BY_PAD_MODE[m.padding_mode],
                            macs=c_out * c_in / m.groups * m.kernel_size[0] * m.kernel_size[1]
                            * m.kernel_size[2])
            if isinstance(m, nn.ConvTranspose3d):
                if m.padding_mode != "zeros":
                    self.unsupported(node, f"padding_mode={m.padding_mode!r}")
                self.template(node, spatial)
                if len(node.args) > 1 or node.kwargs:
                    self.unsupported(node, "it is called with output_size")
                return ConvTranspose(weight=Attr(f"{node.target}.weight"),
                                     bias=Attr(f"{node.target}.bias") if m.bias is not None else None,
                                     kernel=m.kernel_size, stride=m.stride, dilation=m.dilation,
                                     padding=m.padding, groups=m.groups,
                                     macs=c_out * c_in / m.groups * float(
                                         torch.tensor(m.kernel_size).prod() / torch.tensor(m.stride).prod()))
            if isinstance(m, (nn.MaxPool3d, nn.AvgPool3d)):
                self.template(node, spatial)
                return self.pool(node, m, in_shape)
            if isinstance(m, nn.Upsample):
                self.template(node, spatial)
                return self.resample(node, m.mode, m.scale_factor, m.align_corners,
                                     m.recompute_scale_factor, in_shape, out_shape)
            if isinstance(m, (nn.ReflectionPad3d, nn.ReplicationPad3d, nn.ConstantPad3d,
                              nn.ZeroPad3d, nn.CircularPad3d)):
                self.template(node, spatial)
                mode = {nn.ReflectionPad3d: "reflect", nn.ReplicationPad3d: "replicate",
                        nn.CircularPad3d: "circular"}.get(type(m), "constant")
                return self.pad(node, m.padding, mode, getattr(m, "value", 0.0))
            if isinstance(m, nn.InstanceNorm3d):  # reaching here: eval with running stats
                return pointwise(_call_module(node.target), 2)
            if isinstance(m, (nn.BatchNorm3d, nn.BatchNorm2d, nn.BatchNorm1d)):
                if m.training or not m.track_running_stats:
                    self.unsupported(node, "BatchNorm in training mode uses batch statistics; "
                                     "call model.eval() first")
                return pointwise(_call_module(node.target), 2)
            if isinstance(m, _DROPOUT_MODULES):
                if m.training and m.p > 0:  # left active on purpose: MC dropout
                    self.template(node, spatial)
                    return self.dropout(m.p, isinstance(m, (nn.Dropout3d, nn.Dropout2d)),
                                        out_shape)
                return pointwise(_call_module(node.target), 0)
            if isinstance(m, _ACTIVATION_MODULES):
                return pointwise(_call_module(node.target))
            if isinstance(m, ChannelsLastBlock):  # per-voxel ops over channels (ConvNeXt)
                return pointwise(_call_module(node.target), 2 * c_in)
            if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
                channel_dim_only(m.dim)
                return pointwise(_call_module(node.target), 4)
            self.unsupported(node, "no tile kernel is known for this module type")

        if node.op == "call_function":
            fn = node.target
            if fn in (F.conv3d, torch.conv3d):
                args, kwargs = self.template(node, spatial)
                w_val = self.values[node.args[1].name] if isinstance(node.args[1], fx.Node) else None
                kernel = tuple(w_val.shape[2:])
                stride = _triple(self.static(node, _arg(node, 3, "stride", 1), "stride"))
                dilation = _triple(self.static(node, _arg(node, 5, "dilation", 1), "dilation"))
                padding = self.static(node, _arg(node, 4, "padding", 0), "padding")
                groups = self.static(node, _arg(node, 6, "groups", 1), "groups")
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return Conv(weight=args[1] if len(args) > 1 else kwargs["weight"], bias=bias,
                            kernel=kernel, stride=stride, dilation=dilation,
                            pad_lo=_conv_pad_lo(padding, kernel, dilation), groups=groups,
                            macs=c_out * c_in / groups * kernel[0] * kernel[1] * kernel[2])
            if fn is F.conv_transpose3d:
                args, kwargs = self.template(node, spatial)
                w_val = self.values[node.args[1].name]
                kernel = tuple(w_val.shape[2:])
                names = ["stride", "padding", "output_padding", "groups", "dilation"]
                defaults = [1, 0, 0, 1, 1]
                kw = {n: self.static(node, _arg(node, 3 + i, n, d), n)
                      for i, (n, d) in enumerate(zip(names, defaults))}
                groups = kw["groups"]
                stride = _triple(kw["stride"])
                return ConvTranspose(weight=args[1], bias=args[2] if len(args) > 2 else None,
                                     kernel=kernel, stride=stride,
                                     dilation=_triple(kw["dilation"]),
                                     padding=_triple(kw["padding"]), groups=groups,
                                     macs=c_out * c_in / groups * float(
                                         kernel[0] * kernel[1] * kernel[2])
                                     / float(stride[0] * stride[1] * stride[2]))
            if fn is F.instance_norm:  # reaching here: running statistics, pointwise
                return pointwise(_call_function(fn), 2)
            if fn is aten.slice.Tensor:
                return self.slice(node, spatial)
            if fn is aten.repeat.default:
                self.channel_repeat(node, list(self.static(node, _arg(node, 1, "repeats"),
                                                           "repeats")))
                return pointwise(_call_function(fn), 0)
            if fn in _ATEN_IDENTITY:
                return pointwise(_call_function(fn), 0)
            if isinstance(fn, torch._ops.OpOverload) and torch.Tag.pointwise in fn.tags:
                return pointwise(_call_function(fn))
            if fn in (F.max_pool3d, F.avg_pool3d, torch.max_pool3d):
                self.template(node, spatial)
                names = (["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                          "return_indices"] if fn in (F.max_pool3d, torch.max_pool3d) else
                         ["input", "kernel_size", "stride", "padding", "ceil_mode",
                          "count_include_pad", "divisor_override"])
                kw = {n: self.static(node, _arg(node, i, n), n) for i, n in enumerate(names)
                      if _arg(node, i, n) is not None and i > 0}
                if kw.get("return_indices"):
                    self.unsupported(node, "return_indices=True")
                kw.pop("return_indices", None)
                kw.pop("ceil_mode", None)
                cls = nn.MaxPool3d if fn in (F.max_pool3d, torch.max_pool3d) else nn.AvgPool3d
                return self.pool(node, cls(**kw), in_shape)
            if fn in (F.interpolate, F.upsample):
                self.template(node, spatial)
                return self.resample(
                    node, self.static(node, _arg(node, 3, "mode", "nearest"), "mode"),
                    self.static(node, _arg(node, 2, "scale_factor"), "scale_factor"),
                    self.static(node, _arg(node, 4, "align_corners"), "align_corners"),
                    self.static(node, _arg(node, 5, "recompute_scale_factor"), "recompute_scale_factor"),
                    in_shape, out_shape)
            if fn is F.pad:
                pads = list(self.static(node, _arg(node, 1, "pad"), "pad"))
                if any(pads[6:]):  # channels padded (HighResNet's residuals): per voxel
                    if any(pads[:6]) or any(pads[8:]):
                        self.unsupported(node, f"it pads {pads}: channel padding together "
                                         "with spatial or batch padding")
                    return pointwise(_call_function(fn), 0)
                self.template(node, spatial)
                return self.pad(node, self.static(node, _arg(node, 1, "pad"), "pad"),
                                self.static(node, _arg(node, 2, "mode", "constant"), "mode"),
                                self.static(node, _arg(node, 3, "value", 0.0), "value") or 0.0)
            if fn in (F.dropout, F.dropout3d, F.alpha_dropout, F.dropout2d, F.dropout1d):
                p = self.static(node, _arg(node, 1, "p", 0.5), "p")
                if self.static(node, _arg(node, 2, "training", True), "training") and p > 0:
                    if fn is F.alpha_dropout:
                        self.unsupported(node, "alpha_dropout in training mode")
                    self.template(node, spatial)
                    return self.dropout(p, fn in (F.dropout3d, F.dropout2d), out_shape)
                return pointwise(_call_function(fn), 0)
            if fn in _CHANNEL_FUNCTIONS:
                default = 0 if fn in (torch.cat, torch.concat, torch.concatenate) else None
                channel_dim_only(_arg(node, 1, "dim", default))
                return pointwise(_call_function(fn), 4)
            if fn is F.batch_norm:
                if self.static(node, _arg(node, 5, "training", False), "training"):
                    self.unsupported(node, "batch_norm is called with training=True")
                return pointwise(_call_function(fn), 2)
            if fn in _POINTWISE_FUNCTIONS:
                return pointwise(_call_function(fn))
            self.unsupported(node, "no tile kernel is known for this function")

        if node.op == "call_method":
            if node.target == "repeat":  # channels repeated (VNet's input transition)
                reps = [self.static(node, r, "repeats") for r in node.args[1:]]
                reps = list(reps[0]) if len(reps) == 1 and isinstance(reps[0], (list, tuple)) \
                    else reps
                self.channel_repeat(node, reps)
                return pointwise(_call_method("repeat"), 0)
            if node.target in ("softmax", "log_softmax"):
                channel_dim_only(_arg(node, 1, "dim"))
                return pointwise(_call_method(node.target), 4)
            if node.target in _POINTWISE_METHODS:
                return pointwise(_call_method(node.target))
            self.unsupported(node, "no tile kernel is known for this method")
        self.unsupported(node, f"fx op kind {node.op!r} is not expected here")

    def slice(self, node, spatial):
        """``x[:, :, a:b]``: on a spatial axis a crop (a region shift), on the channel
        axis a per-voxel selection."""
        dim = self.static(node, _arg(node, 1, "dim", 0), "dim") % 5
        start = self.static(node, _arg(node, 2, "start"), "start") or 0
        step = self.static(node, _arg(node, 4, "step", 1), "step")
        if step != 1:
            self.unsupported(node, f"it slices with step {step}")
        if dim in (0, 1):  # the batch of one, or channels: per voxel
            return self.pointwise_call(node, spatial, aten.slice.Tensor, 0)
        self.template(node, spatial)
        src = self.values[node.args[0].name].shape[dim]
        start = start + src if start < 0 else min(start, src)
        lo = [0, 0, 0]
        lo[dim - 2] = -start
        return Pad(pad_lo=tuple(lo))

    def channel_repeat(self, node, reps):
        """``x.repeat(1, k, 1, 1, 1)`` is per voxel; repeats of other dims are refused."""
        if len(reps) != 5 or reps[0] != 1 or any(r != 1 for r in reps[2:]):
            self.unsupported(node, f"it repeats {tuple(reps)}; only the channel dim may be "
                             "repeated")

    def pointwise_call(self, node, spatial, fn, macs):
        args, kwargs = self.template(node, spatial)
        return Pointwise(n_inputs=len(spatial), call=_call_function(fn), args=args,
                         kwargs=kwargs, macs=macs, monotone=False)

    def dropout(self, p, channelwise, out_shape):
        self.n_dropout = getattr(self, "n_dropout", 0) + 1
        return PositionalDropout(p=float(p), channelwise=channelwise, layer=self.n_dropout,
                                 full_shape=out_shape, macs=2.0)

    def pool(self, node, m, in_shape):
        if getattr(m, "return_indices", False):
            self.unsupported(node, "return_indices=True")
        kernel = _triple(m.kernel_size)
        stride = _triple(m.stride or m.kernel_size)  # None, or ATen's [] for "the kernel"
        padding = _triple(m.padding)
        kind = "max" if isinstance(m, nn.MaxPool3d) else "avg"
        return Pool(kind=kind, kernel=kernel, stride=stride,
                    dilation=_triple(getattr(m, "dilation", 1)), padding=padding,
                    count_include_pad=getattr(m, "count_include_pad", True),
                    divisor_override=getattr(m, "divisor_override", None), in_shape=in_shape,
                    macs=float(kernel[0] * kernel[1] * kernel[2]))

    def resample(self, node, mode, scale_factor, align_corners, recompute, in_shape, out_shape):
        if mode not in ("nearest", "nearest-exact", "trilinear", "linear"):
            self.unsupported(node, f"interpolation mode {mode!r}; nearest, nearest-exact and "
                             "trilinear are supported")
        if scale_factor is None or recompute:
            scales = (None,) * 3
        elif isinstance(scale_factor, (tuple, list)):
            scales = tuple(float(s) for s in scale_factor)
        else:
            scales = (float(scale_factor),) * 3
        tables = tuple(resample_indices(mode, n_in, n_out, s, align_corners)
                       for n_in, n_out, s in zip(in_shape, out_shape, scales))
        # Nominal grid ratio, for chunk alignment only (tiles are exact for any ratio):
        # size=skip.shape[2:] on odd sizes still counts as a factor of 2.
        scale = tuple(Fraction(n_out, n_in).limit_denominator(4)
                      for n_in, n_out in zip(in_shape, out_shape))
        factors = None
        if not align_corners and all(o % i == 0 and (s is None or s == o // i)
                                     for i, o, s in zip(in_shape, out_shape, scales)):
            factors = tuple(float(o // i) for i, o in zip(in_shape, out_shape))
        return Resample(mode=mode, tables=tables, scale=scale, macs=8.0, factors=factors,
                        align_corners=align_corners)

    def pad(self, node, pad, mode, value):
        pad = list(pad) + [0] * (6 - len(pad))
        # F.pad lists (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)
        lo = (pad[4], pad[2], pad[0])
        fill = Fill("constant", float(value)) if mode == "constant" else _FILL_BY_PAD_MODE.get(mode)
        if fill is None:
            self.unsupported(node, f"pad mode {mode!r}")
        return Pad(pad_lo=lo, fill=fill)


class _Recorder(nn.Module):
    """Runs a GraphModule node by node, keeping every node's value."""

    def __init__(self, gm):
        super().__init__()
        self.gm = gm
        self.values = {}

    def forward(self, x):
        interp = fx.Interpreter(self.gm)
        values = self.values

        def run_node(n, _orig=interp.run_node):
            v = _orig(n)
            values[n.name] = v
            return v
        interp.run_node = run_node
        return interp.run(x)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    constants = forward_defaults(model)
    try:
        gm = fx.symbolic_trace(model, concrete_args=constants or None)
    except Exception as e:  # fx raises many kinds for data-dependent control flow
        raise TraceError(
            f"torch.fx could not capture {type(model).__name__}{user_frame(e)}: "
            f"{type(e).__name__}: {first_line(e)}. exact mode needs a forward without Python control "
            "flow on tensor values or conversions of them (torch.as_tensor, numpy); make that "
            "line static, or run mode='window', which calls the model as it is") from e
    return _drop_constant_inputs(gm, constants) if constants else gm


def first_line(exc: BaseException) -> str:
    """An exception's message without torch.fx's multi-line context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def user_frame(exc: BaseException) -> str:
    """' at FILE:LINE in FUNCTION (`source`)' for the innermost frame of the traceback
    that is not torch's own: the model's line at fault."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename
              and f"{os.sep}volarray{os.sep}" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    where = os.sep.join(Path(f.filename).parts[-3:])
    return f" at {where}:{f.lineno} in {f.name} (`{(f.line or '').strip()}`)"


def forward_defaults(model: nn.Module) -> dict:
    """The arguments of ``forward`` after the volume, at their defaults (torchseis'
    ``forward(x, rank=0)``, ``forward(x, prompt=None)``): constants of the capture, as
    they are of ``model(volume)``. An argument without a default is refused."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    constants = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TraceError(
                f"{type(model).__name__}.forward takes a second input {p.name!r} without a "
                "default; volarray passes only the volume. Wrap the model so that forward(x) "
                f"calls it with the {p.name!r} you want")
        constants[p.name] = p.default
    return constants


def _drop_constant_inputs(gm: fx.GraphModule, constants: dict) -> fx.GraphModule:
    """fx keeps specialized arguments as placeholders guarded by asserts; remove both,
    so that the graph takes the volume alone."""
    graph = gm.graph
    extra = [n for n in graph.nodes if n.op == "placeholder"][1:]
    guards = {torch._assert, fx._symbolic_trace._assert_is_none}
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in guards:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for node in extra:
        if node.users:
            raise TraceError(f"the forward uses its argument {node.target!r} as a value; wrap "
                             "the model so that forward(x) takes the volume alone")
        graph.erase_node(node)
    gm.recompile()
    return gm


class MetaRunError(TraceError):
    """The captured graph fails on meta tensors of the whole volume's shape."""


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's weights (float32 when it has none)."""
    params = list(model.parameters())
    return params[0].dtype if params else torch.float32


def meta_forward(model: nn.Module, input_shape, dtype=torch.float32):
    """``model`` itself (not a capture) on an empty meta tensor: its output, at no cost,
    with the model left exactly as it was. Raises what the forward raises."""
    with meta_weights(model), torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's advice, shown by the model
        return model(torch.empty(input_shape, dtype=dtype, device="meta"))


@contextlib.contextmanager
def meta_weights(module: nn.Module):
    """Within the block, every parameter and buffer of ``module`` is an empty tensor on
    the meta device; afterwards each is exactly the object it was. (Unlike
    torch.func.functional_call, this restores models in which one submodule has two
    names, as MONAI's DynUNet and nnU-Net's networks have: each module object is
    visited once.)"""
    saved = []
    try:
        for m in module.modules():  # each module object once, however many names it has
            for store in (m._parameters, m._buffers):
                for name, t in list(store.items()):
                    if t is None or t.is_meta:
                        continue
                    saved.append((store, name, t))
                    empty = torch.empty_like(t, device="meta")
                    store[name] = nn.Parameter(empty, t.requires_grad) if isinstance(
                        t, nn.Parameter) else empty
        yield module
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def meta_values(gm: fx.GraphModule, input_shape, dtype) -> dict:
    """Every node's whole-volume value, computed on fake tensors (no memory, no time;
    unlike meta tensors, they mix with the CPU constants a forward may create)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    rec = _Recorder(gm)
    try:
        with warnings.catch_warnings(), quiet_fake_tensors(), \
                FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore", UserWarning)  # torch's advice, shown by the model
            rec(torch.empty(input_shape, dtype=dtype))
    except Exception as e:
        channel_mismatch(gm, input_shape, e)
        raise MetaRunError(
            f"the model does not accept an input of shape {tuple(input_shape)}: "
            f"{type(e).__name__}: {first_line(e)}. Check the volume's shape and channel "
            "count.") from e
    return rec.values


def channel_mismatch(model: nn.Module, input_shape, error: Exception) -> None:
    """Raise a TraceError naming the channel counts when the model's first convolution
    takes another number of channels than the volume has."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != input_shape[1]:
        raise TraceError(
            f"the model's first convolution takes {first.in_channels} input "
            f"channel(s); the volume has {input_shape[1]} (shape {tuple(input_shape[1:])}): "
            "pass a (C, Z, Y, X) volume with the channels the model was trained on") from error


@contextlib.contextmanager
def quiet_fake_tensors():
    """torch logs every op that fails on fake tensors, with its traceback, before the
    exception reaches volarray, which reports it in one line."""
    import logging
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def pick_output(y, select=None, what: str = "the model"):
    """The prediction among a model's outputs: the tensor itself; element ``select`` of
    a list or tuple (by default the first: nnU-Net's deep-supervision convention, the
    full-resolution head); entry ``select`` of a dict, which must be named."""
    if isinstance(y, (list, tuple)) and y:
        index = 0 if select is None else select
        if not isinstance(index, int) or isinstance(index, bool) or not -len(y) <= index < len(y):
            raise InputError(f"select={select!r}: {what} returns a {type(y).__name__} of "
                             f"{len(y)} outputs; pass select= an index from 0 to {len(y) - 1}")
        return y[index]
    if isinstance(y, dict):
        if select not in y:
            raise InputError(f"select={select!r}: {what} returns a dict with keys {list(y)}; "
                             "pass select= the key of the prediction")
        return y[select]
    if select not in (None, 0):
        raise InputError(f"select={select!r}: {what} returns one output; pass select=None")
    return y


def select_output(gm: fx.GraphModule, select=None) -> fx.GraphModule:
    """The capture reduced to the one output ``select`` picks (see `pick_output`)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    res = out.args[0]
    if isinstance(res, fx.Node):
        pick_output(res, select)  # refuses a select= that a single output has no use for
        return gm
    if not isinstance(res, (list, tuple, dict)):
        return gm
    out.args = (pick_output(res, select),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


_captures: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def capture(model: nn.Module, input_shape, select=None, dtype=None) -> fx.GraphModule:
    """``model`` captured with torch.export for an input of ``input_shape``, lowered
    to torch functions, channels-last chains fused, reduced to the output ``select``
    picks. Kept per model while its modules, modes and weights stay the same (a
    tensor's version counter moves with every in-place change, load_state_dict too)."""
    forward_defaults(model)  # a second input without a default is refused by name
    dtype = dtype or model_dtype(model)
    key = (tuple(input_shape), repr(select), dtype,
           tuple((id(m), m.training) for m in model.modules()),
           tuple((id(t), t._version) for t in itertools.chain(model.parameters(),
                                                              model.buffers())))
    kept = _captures.setdefault(model, {})
    if key not in kept:
        if len(kept) > 8:
            kept.clear()
        gm = export_graph(model, input_shape, dtype)
        kept[key] = select_output(fuse_channels_last(gm), select)
    return kept[key]


def trace(model: nn.Module, input_shape, select=None) -> Graph:
    """Trace ``model`` for an input of shape (1, C, Z, Y, X); of several outputs, the
    one ``select`` picks. torch.export captures it (control flow resolved as the real
    forward resolves it); torch.fx only where export cannot, and both captures are
    checked against the model's own forward on a probe input."""
    dtype = model_dtype(model)
    try:
        return _trace_exported(model, input_shape, select, dtype)
    except InputError:
        raise
    except (TraceError, UnsupportedOpError) as export_error:
        try:
            return _trace_fx(model, input_shape, select, dtype)
        except (TraceError, UnsupportedOpError):
            attention = global_attention(model)
            if attention and "transformer" not in str(export_error):
                raise UnsupportedOpError(
                    f"exact mode cannot place {type(model).__name__}: its module "
                    f"'{attention[0]}' ({attention[1]}) is a transformer's global attention, "
                    "where every output voxel depends on the whole input: no tiling of the "
                    "volume can compute that. Run the model with mode='window' and window= "
                    "the size it was trained on (it equals MONAI's sliding_window_inference "
                    f"there). (The capture stopped at: {first_line(export_error)[:300]})"
                ) from export_error
            raise export_error from None


_ATTENTION = re.compile(r"SelfAttention|WindowAttention|SABlock|MultiheadAttention|"
                        r"Transformer|ViT|Swin")


def global_attention(model: nn.Module):
    """(path, class name) of the first attention / transformer module, or None."""
    for name, m in model.named_modules():
        if name and _ATTENTION.search(type(m).__name__):
            return name, type(m).__name__
    return None


def _trace_exported(model, input_shape, select, dtype) -> Graph:
    try:
        graph = _trace_graph(capture(model, input_shape, select, dtype), input_shape, dtype)
    except (TraceError, UnsupportedOpError) as e:
        _raise_if_padding_helps(model, input_shape, dtype, e,
                                lambda shape: _trace_graph(capture(model, shape, select, dtype),
                                                           shape, dtype))
        raise
    from .plan import alignment
    check_capture(model, graph.gm, input_shape[1], tuple(input_shape[2:]), alignment(graph),
                  dtype, lambda y: pick_output(y, select),
                  recapture=lambda shape: capture(model, shape, select, dtype))
    return graph


def _trace_fx(model, input_shape, select, dtype) -> Graph:
    gm = select_output(fuse_channels_last(symbolic_trace(model)), select)
    try:
        graph = _trace_graph(gm, input_shape, dtype)
    except (TraceError, UnsupportedOpError) as e:
        _raise_if_padding_helps(model, input_shape, dtype, e,
                                lambda shape: _trace_graph(gm, shape, dtype))
        _raise_if_forward_runs(model, input_shape, dtype, e)
        raise
    from .plan import alignment
    check_capture(model, gm, input_shape[1], tuple(input_shape[2:]), alignment(graph), dtype,
                  lambda y: pick_output(y, select))
    return graph


def _trace_graph(gm: fx.GraphModule, input_shape, dtype) -> Graph:
    values = meta_values(gm, input_shape, dtype)
    b = _Builder(gm, values, input_shape[2:])
    inp, out = b.build(gm.graph)
    return Graph(gm, b.nodes, inp, out, dtype, b.globals)


def _raise_if_forward_runs(model, input_shape, dtype, error: Exception) -> None:
    """The capture fails on meta tensors where the model's own forward runs: the capture
    took another path through forward than the model does (an isinstance() guard on a
    traced value, as in MONAI's BasicUNet): say so, instead of the symptom."""
    if not isinstance(error, MetaRunError):
        return
    try:
        meta_forward(model, input_shape, dtype)
    except Exception:
        return  # the model itself fails too: the original message stands
    raise TraceError(
        f"the graph torch.fx captured from {type(model).__name__} fails on an input of shape "
        f"{tuple(input_shape)} where the model's own forward runs ({str(error).split(': ', 1)[-1][:200]}): "
        "the capture took another path through forward, as Python control flow that looks "
        "at a tensor (isinstance(..., torch.Tensor), a branch on a value) does at capture; "
        "make it static, or run mode='window', which calls the model as it is") from error


def _raise_if_padding_helps(model, input_shape, dtype, error: Exception, trace_at) -> None:
    """On a failed trace only: if padding the volume's sides up to a multiple (as U-Nets
    need) makes the trace succeed, raise an InputError that says so; else return.
    ``trace_at(input_shape)`` traces at another shape."""
    from .padding import padding_error
    if len(input_shape) != 5:
        return
    c = input_shape[1]
    message = padding_error(type(model).__name__, model, c, tuple(input_shape[2:]),
                            lambda shape: trace_at((1, c) + tuple(shape)))
    if message is not None:
        raise InputError(message) from error


def fuse_argmax_head(graph: Graph, block: int = 32) -> bool:
    """Replace the classifier conv and the monotone ops after it (sigmoid, softmax) by
    one op computing the argmax in class blocks. False if the head is not of that form."""
    consumers = graph.consumers()
    name, chain = graph.output, []
    while isinstance(graph.nodes[name].op, Pointwise) and graph.nodes[name].op.monotone:
        chain.append(name)
        name = graph.nodes[name].inputs[0] if graph.nodes[name].inputs else None
        if name is None or len(consumers[name]) != 1 or len(graph.nodes[chain[-1]].inputs) != 1:
            return False
    conv = graph.nodes[name]
    op = conv.op
    if type(op) is not Conv or op.groups != 1:
        return False
    fused = ArgmaxConv(weight=op.weight, bias=op.bias, kernel=op.kernel, stride=op.stride,
                       dilation=op.dilation, pad_lo=op.pad_lo, groups=op.groups, fill=op.fill,
                       macs=op.macs, block=block, classes=conv.channels,
                       scratch_channels=min(block, conv.channels) * 2)
    for n in chain + [name]:
        del graph.nodes[n]
    head = f"{name}_argmax"
    graph.nodes[head] = Node(head, fused, conv.inputs, conv.shape, 1, conv.scale,
                             conv.where + " fused with argmax")
    graph.output = head
    return True
