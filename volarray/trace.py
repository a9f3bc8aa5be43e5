"""Capture a model and give every op its spatial signature.

The capture is a torch.fx graph shaped on meta tensors where the probe check accepts it
(fast: no torch._dynamo import), else torch.export's (`volarray.capture`), lowered to torch
functions; torch.fx's symbolic trace where export cannot capture the model either. The result is a `Graph`: spatial nodes in
topological order, each with the whole-volume shape of its output and a tile kernel
from `volarray.ops`. Whole-volume shapes come from running the captured graph on fake
tensors, so tracing a 4096^3 volume costs nothing.

This module walks the captured graph; what each op becomes is the op registry's
(`volarray.ops.table`), whose builders see one node through an `OpContext`.
"""
from __future__ import annotations

import copy
import re
import warnings
from fractions import Fraction

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import capture, fx_capture, innermost_module, phase
from .diagnostics import channel_mismatch, first_line, quiet_fake_tensors
from .errors import InputError, TraceError, UnsupportedOpError
from .geometry import nominal_scale
from .graph import Graph, Node, alignment
from .metashapes import shaped_call, shaped_method, shaped_module
from .modelcall import meta_forward, model_dtype, pick_output
from .padding import padding_error
from .selfcheck import check_capture
from .ops.base import Attr, GlobalArg, SpatialArg
from .ops.calls import node_call
from .ops.pointwise import Pointwise
from .ops.reduce import Broadcast, GlobalNode
from .ops.table import OPS


class OpContext:
    """One captured node as an op's builder sees it (`volarray.ops.registry`): its
    arguments, whole-volume shapes and channels, and the walk's helpers."""

    def __init__(self, walker: "_Walker", node: fx.Node):
        self.walker, self.node, self.name = walker, node, node.name
        self.module = walker.modules.get(node.target) if node.op == "call_module" else None
        self.value = walker.values[node.name]  # the output's whole-volume (fake) value
        self.spatial: list[str] = []  # spatial inputs, in the op's argument order
        first = node.all_input_nodes[0] if node.all_input_nodes else None
        inp = walker.values.get(first.name) if first is not None else None
        is_tensor = isinstance(inp, torch.Tensor)
        self.in_shape = tuple(inp.shape[2:]) if is_tensor else ()
        self.c_in = inp.shape[1] if is_tensor and inp.dim() == 5 else 1
        self.out_shape = tuple(self.value.shape[2:])
        self.c_out = self.value.shape[1] if self.value.dim() > 1 else 1

    @property
    def where(self) -> str:
        return self.walker.where(self.node)

    def unsupported(self, why: str):
        """Refuse the node, naming it and ``why``."""
        self.walker.unsupported(self.node, why)

    def arg(self, i: int, name: str, default=None):
        """Argument ``i`` (or keyword ``name``) as captured: a python value or a node."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def static(self, value, what: str):
        """A python value for a layer hyper-parameter; constants are resolved."""
        return self.walker.static(self.node, value, what)

    def param(self, i: int, name: str, default=None):
        """Argument ``i`` (or ``name``) as a static hyper-parameter."""
        return self.static(self.arg(i, name, default), name)

    def template(self):
        """The call's (args, kwargs) with markers for spatial inputs (recorded in
        ``spatial``), whole-volume values and parameters."""
        return self.walker.template(self.node, self.spatial)

    def spatial_input(self, i: int) -> str | None:
        """The spatial node passed as argument ``i``, recorded as an input; else None."""
        a = self.arg(i, "input")
        if not isinstance(a, fx.Node) or a.name not in self.walker.nodes:
            return None
        if a.name not in self.spatial:
            self.spatial.append(a.name)
        return a.name

    def meta(self, a: fx.Node):
        """The whole-volume (fake) value of a node argument (a weight's shape)."""
        return self.walker.values[a.name]

    def attr(self, name: str) -> Attr:
        """A parameter of the called module (``weight``, ``bias``)."""
        return Attr(f"{self.node.target}.{name}")

    def add_global(self, g: GlobalNode) -> None:
        """A whole-volume value the op reads (a norm's statistics)."""
        self.walker.globals[g.name] = g

    def serial(self, kind: str) -> int:
        """1, 2, 3, ... for successive ops of ``kind`` in graph order (dropout layers)."""
        self.walker.counts[kind] = self.walker.counts.get(kind, 0) + 1
        return self.walker.counts[kind]


class _Walker:
    """Walks the fx graph once, classifying nodes and building their tile ops."""

    def __init__(self, gm: fx.GraphModule, values: dict, input_shape):
        self.gm = gm
        self.values = values  # node name -> meta value (tensors on meta, python values)
        self.modules = dict(gm.named_modules())
        self.nodes: dict[str, Node] = {}
        self.inline: dict[str, object] = {}  # shape-derived python values, inlined as constants
        self.attrs: dict[str, str] = {}  # node name -> attribute path for constant tensors
        self.globals: dict[str, GlobalNode] = {}
        self.counts: dict[str, int] = {}  # ops of a kind so far (see OpContext.serial)
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
            "with the supported local ops (see volarray.ops.table), or run it with a patch-based "
            "sliding window instead of method='exact'.")

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
                inp = self.placeholder(node, inp)
                depends.add(node.name)
            elif node.op == "output":
                out = self.output(node)
            elif not any(a.name in depends for a in node.all_input_nodes):
                self.constant(node)
            else:
                depends.add(node.name)
                self.dependent(node)
        return inp, out

    def placeholder(self, node: fx.Node, seen: str | None) -> str:
        if seen is not None:
            raise TraceError(
                f"the model's forward takes more than one tensor argument "
                f"('{seen}', '{node.name}'); volarray passes only the volume. Wrap the "
                "model so that forward(x) takes the volume alone.")
        v = self.values[node.name]
        self.nodes[node.name] = Node(node.name, None, (), tuple(v.shape[2:]), v.shape[1],
                                     (Fraction(1),) * 3, "the input")
        return node.name

    def output(self, node: fx.Node) -> str:
        res = node.args[0]
        if not isinstance(res, fx.Node) or res.name not in self.nodes:
            raise UnsupportedOpError(
                "the model must return one tensor of shape (1, C, Z, Y, X); it returns "
                f"{res!r}. Wrap the model to return the prediction tensor alone.")
        return res.name

    def dependent(self, node: fx.Node):
        """A node computed from the volume: a python value, a whole-volume value, or a
        spatial tensor."""
        value = self.values[node.name]
        if not isinstance(value, torch.Tensor):
            self.inline[node.name] = value  # e.g. x.shape[2:], for F.interpolate(size=...)
            return
        if (not any(a.name in self.nodes for a in node.all_input_nodes)
                or self.is_broadcast_of_global(node)):
            self.global_value(node, value)
            return
        self.spatial(node, value)

    # -- whole-volume values
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
                                         value.shape[1], self.scale_of(shape), self.where(node))
            return
        args, kwargs = self.template(node, [])
        deps = tuple(a.name for a in node.all_input_nodes if a.name in self.globals)
        self.globals[node.name] = GlobalNode(node.name, "eval", self.where(node),
                                             call=node_call(node), args=args, kwargs=kwargs,
                                             deps=deps, shape=tuple(value.shape))

    def constant(self, node: fx.Node):
        if node.op == "get_attr":
            self.attrs[node.name] = node.target
            return
        # A computation on parameters only: evaluated on the worker like an attribute.
        self.attrs[node.name] = f"@{node.name}"

    # -- spatial tensors
    def scale_of(self, shape) -> tuple[Fraction, ...]:
        return tuple(nominal_scale(n, n_in) for n, n_in in zip(shape, self.input_shape))

    def spatial(self, node: fx.Node, value: torch.Tensor):
        """The registry's op for a node that reads the volume: a tile op, or a
        whole-volume value (a reduction)."""
        ctx = OpContext(self, node)
        builder = OPS.lookup(node, ctx.module)
        op = builder(ctx) if builder is not None else None
        if isinstance(op, GlobalNode):
            self.globals[node.name] = op
            return
        if value.dim() != 5:
            self.unsupported(node, f"it returns a tensor of shape {tuple(value.shape)}, "
                             "not (1, C, Z, Y, X)")
        if op is None:
            kind = {"call_module": "module type", "call_function": "function",
                    "call_method": "method"}.get(node.op)
            self.unsupported(node, f"no tile kernel is known for this {kind}" if kind else
                             f"fx op kind {node.op!r} is not expected here")
        shape = tuple(value.shape[2:])
        if isinstance(op, Pointwise):
            for s in ctx.spatial:
                if self.nodes[s].shape != shape:
                    self.unsupported(node, f"it combines a tensor of spatial shape "
                                     f"{self.nodes[s].shape} with one of {shape}; shapes "
                                     "must match")
        self.nodes[node.name] = Node(node.name, op, tuple(ctx.spatial), shape, value.shape[1],
                                     self.scale_of(shape), self.where(node))


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


class MetaRunError(TraceError):
    """The captured graph fails on meta tensors of the whole volume's shape."""


def meta_values(gm: fx.GraphModule, input_shape, dtype) -> dict:
    """Every node's whole-volume value, computed on fake tensors (no memory, no time;
    unlike meta tensors, they mix with the CPU constants a forward may create), the
    input on the weights' device."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .devices import input_device
    rec = _Recorder(gm)
    try:
        with warnings.catch_warnings(), quiet_fake_tensors(), \
                FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore", UserWarning)  # torch's advice, shown by the model
            rec(torch.empty(input_shape, dtype=dtype, device=input_device(gm)))
    except Exception as e:
        channel_mismatch(gm, input_shape, e)
        raise MetaRunError(
            f"the model does not accept an input of shape {tuple(input_shape)}: "
            f"{type(e).__name__}: {first_line(e)}. Check the volume's shape and channel "
            "count.") from e
    return rec.values


def trace(model: nn.Module, input_shape, select=None) -> Graph:
    """Trace ``model`` for an input of shape (1, C, Z, Y, X); of several outputs, the
    one ``select`` picks. A torch.fx capture that the probe check accepts serves first
    (`fast_trace`: milliseconds, where torch.export's first call in a process imports
    torch._dynamo for seconds); else torch.export captures it (control flow resolved as
    the real forward resolves it); torch.fx only where export cannot, and every capture
    is checked against the model's own forward on a probe input."""
    with phase("tracing", f"{type(model).__name__} for an input of {tuple(input_shape)}"):
        return _trace(model, input_shape, select, model_dtype(model))


def _trace(model, input_shape, select, dtype) -> Graph:
    graph = fast_trace(model, input_shape, select, dtype)
    if graph is not None:
        return graph
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
                    "volume can compute that. Run the model with method='window' and roi_size= "
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


def fast_trace(model, input_shape, select, dtype) -> Graph | None:
    """``model`` captured with torch.fx, its whole-volume shapes computed on meta tensors
    (no fake tensors, no torch.export: nothing imports torch._dynamo), and checked on the
    probe as every capture is; None where any step fails or the check refuses the graph,
    and `trace` captures with torch.export as before. An fx graph holds for every input
    shape (fx refuses a branch on a size), so the probe checks it once for all shapes."""
    if has_submodule_hooks(model):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx's advice; the export path says what fails
            gm = fx_capture(model, select)
            values = meta_shapes(gm, input_shape, dtype)
        walker = _Walker(gm, values, input_shape[2:])
        inp, out = walker.build(gm.graph)
        graph = Graph(gm, walker.nodes, inp, out, dtype, walker.globals)
        check_capture(model, gm, input_shape[1], tuple(input_shape[2:]), alignment(graph),
                      dtype, lambda y: pick_output(y, select))
    except Exception:  # noqa: BLE001 - whatever fails here, torch.export decides
        return None
    return graph


def has_submodule_hooks(model: nn.Module) -> bool:
    """Whether a forward hook or pre-hook may change what a submodule returns: one on a
    submodule of ``model``, or a global one. torch.fx records a leaf module's call, and
    the tile op made from it runs its function alone: the hook would be lost, while the
    probe check, running the fx graph through the module itself, would see it run. Such
    a model goes to torch.export, which traces the hooks as part of the forward."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               for m in model.modules() if m is not model)


def meta_shapes(gm: fx.GraphModule, input_shape, dtype) -> dict:
    """Every node's whole-volume value, as `meta_values` computes it, on meta tensors:
    each module runs as a copy with meta weights (`meta_copy`), so that the model
    itself, which the fx graph shares, is never touched (a task of an earlier run may be
    reading it). Raises what the graph raises: a CPU constant made in forward does not
    mix with meta tensors."""
    values, copies = {}, {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = v = super().run_node(n)
            return v

        def get_attr(self, target, args, kwargs):
            v = super().get_attr(target, args, kwargs)
            return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v

        def call_module(self, target, args, kwargs):
            module = self.fetch_attr(target)
            out = shaped_module(module, args, kwargs)
            if out is not None:
                return out
            if target not in copies:
                copies[target] = meta_copy(module)
            return copies[target](*args, **kwargs)

        def call_function(self, target, args, kwargs):
            out = shaped_call(target, args, kwargs)  # cat's, pointwise ops' (`metashapes`)
            return super().call_function(target, args, kwargs) if out is None else out

        def call_method(self, target, args, kwargs):
            out = shaped_method(target, args, kwargs)
            return super().call_method(target, args, kwargs) if out is None else out
    with torch.no_grad():
        Recorder(gm).run(torch.empty(input_shape, dtype=dtype, device="meta"))
    return values


def meta_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` and its submodules whose parameters and buffers are
    empty meta tensors; ``module`` itself is left as it is."""
    new = copy.copy(module)
    new._parameters = {k: None if t is None else nn.Parameter(
        torch.empty_like(t, device="meta"), t.requires_grad)
        for k, t in module._parameters.items()}
    new._buffers = {k: None if t is None else torch.empty_like(t, device="meta")
                    for k, t in module._buffers.items()}
    new._modules = {k: None if m is None else meta_copy(m) for k, m in module._modules.items()}
    return new


def _trace_exported(model, input_shape, select, dtype) -> Graph:
    try:
        graph = _trace_graph(capture(model, input_shape, select, dtype), input_shape, dtype)
    except (TraceError, UnsupportedOpError) as e:
        _raise_if_padding_helps(model, input_shape, dtype, e,
                                lambda shape: _trace_graph(capture(model, shape, select, dtype),
                                                           shape, dtype))
        raise
    check_capture(model, graph.gm, input_shape[1], tuple(input_shape[2:]), alignment(graph),
                  dtype, lambda y: pick_output(y, select),
                  recapture=lambda shape: capture(model, shape, select, dtype))
    return graph


def _trace_fx(model, input_shape, select, dtype) -> Graph:
    gm = fx_capture(model, select)
    try:
        graph = _trace_graph(gm, input_shape, dtype)
    except (TraceError, UnsupportedOpError) as e:
        _raise_if_padding_helps(model, input_shape, dtype, e,
                                lambda shape: _trace_graph(gm, shape, dtype))
        _raise_if_forward_runs(model, input_shape, dtype, e)
        raise
    check_capture(model, gm, input_shape[1], tuple(input_shape[2:]), alignment(graph), dtype,
                  lambda y: pick_output(y, select))
    return graph


def _trace_graph(gm: fx.GraphModule, input_shape, dtype) -> Graph:
    values = meta_values(gm, input_shape, dtype)
    b = _Walker(gm, values, input_shape[2:])
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
        "make it static, or run method='window', which calls the model as it is") from error


def _raise_if_padding_helps(model, input_shape, dtype, error: Exception, trace_at) -> None:
    """On a failed trace only: if padding the volume's sides up to a multiple (as U-Nets
    need) makes the trace succeed, raise an InputError that says so; else return.
    ``trace_at(input_shape)`` traces at another shape."""
    if len(input_shape) != 5:
        return
    c = input_shape[1]
    message = padding_error(type(model).__name__, model, c, tuple(input_shape[2:]),
                            lambda shape: trace_at((1, c) + tuple(shape)))
    if message is not None:
        raise InputError(message, parameter="pad") from error


