"""Capture a model with torch.export, as a graph of the torch functions volarray places.

``torch.export`` (non-strict) runs the model's own Python forward on fake tensors, so
control flow resolves exactly as the real forward resolves it: ``isinstance`` guards,
branches on static shapes, ``tuple(x.shape)``, ``round()``, ``torch.as_tensor`` of a
shape. It records one canonical ATen op per call, whatever form the model used
(module, functional, method). `lower` maps each ATen op to the one torch function the
graph builder knows for it, with the arguments in that function's order (the table
`LOWERING`, keyed by ATen op: adding an op touches one entry); ops outside the table
stay ATen ops, and the builder places those tagged pointwise as they are.

Shapes are concrete: a capture holds for one input shape. Whole-volume captures run on
fake tensors, so capturing a 4096^3 volume costs nothing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .errors import TraceError

aten = torch.ops.aten


@dataclass(frozen=True)
class Const:
    """A fixed argument of the lowered call (the mode of an interpolation)."""
    value: object


# ATen op -> (torch function, the ATen argument names in the function's positional order)
LOWERING = {
    aten.conv3d.default: (F.conv3d, ("input", "weight", "bias", "stride", "padding",
                                     "dilation", "groups")),
    aten.conv3d.padding: (F.conv3d, ("input", "weight", "bias", "stride", "padding",
                                     "dilation", "groups")),
    aten.conv_transpose3d.input: (F.conv_transpose3d, ("input", "weight", "bias", "stride",
                                                       "padding", "output_padding", "groups",
                                                       "dilation")),
    aten.max_pool3d.default: (F.max_pool3d, ("self", "kernel_size", "stride", "padding",
                                             "dilation", "ceil_mode")),
    aten.avg_pool3d.default: (F.avg_pool3d, ("self", "kernel_size", "stride", "padding",
                                             "ceil_mode", "count_include_pad",
                                             "divisor_override")),
    aten.adaptive_avg_pool3d.default: (F.adaptive_avg_pool3d, ("self", "output_size")),
    aten.upsample_trilinear3d.vec: (F.interpolate, ("input", "output_size", "scale_factors",
                                                    Const("trilinear"), "align_corners")),
    aten.upsample_nearest3d.vec: (F.interpolate, ("input", "output_size", "scale_factors",
                                                  Const("nearest"))),
    aten._upsample_nearest_exact3d.vec: (F.interpolate, ("input", "output_size",
                                                         "scale_factors",
                                                         Const("nearest-exact"))),
    aten.pad.default: (F.pad, ("self", "pad", "mode", "value")),
    aten.constant_pad_nd.default: (F.pad, ("self", "pad", Const("constant"), "value")),
    aten.instance_norm.default: (F.instance_norm, ("input", "running_mean", "running_var",
                                                   "weight", "bias", "use_input_stats",
                                                   "momentum", "eps")),
    aten.group_norm.default: (F.group_norm, ("input", "num_groups", "weight", "bias", "eps")),
    aten.batch_norm.default: (F.batch_norm, ("input", "running_mean", "running_var", "weight",
                                             "bias", "training", "momentum", "eps")),
    aten.layer_norm.default: (F.layer_norm, ("input", "normalized_shape", "weight", "bias",
                                             "eps")),
    aten.linear.default: (F.linear, ("input", "weight", "bias")),
    aten.dropout.default: (F.dropout, ("input", "p", "train")),
    aten.feature_dropout.default: (F.dropout3d, ("input", "p", "train")),
    aten.alpha_dropout.default: (F.alpha_dropout, ("input", "p", "train")),
    aten.cat.default: (torch.cat, ("tensors", "dim")),
    aten.softmax.int: (torch.softmax, ("self", "dim")),
    aten._softmax.default: (torch.softmax, ("self", "dim")),
    aten.log_softmax.int: (torch.log_softmax, ("self", "dim")),
    aten._log_softmax.default: (torch.log_softmax, ("self", "dim")),
    aten.prelu.default: (F.prelu, ("self", "weight")),
    aten.permute.default: (torch.permute, ("self", "dims")),
    aten.mean.dim: (torch.mean, ("self", "dim", "keepdim")),
}
# recorded by export for its own bookkeeping; no value flows through them
_DROPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default}


def functional(op):
    """The out-of-place form of an in-place ATen op (relu_ -> relu); tiles are fresh
    tensors, and an in-place op on a tile another op still reads would be wrong."""
    if not isinstance(op, torch._ops.OpOverload) or not op._schema.is_mutable:
        return op
    name = op._opname
    if name.endswith("_") and not name.startswith("_"):
        packet = getattr(aten, name[:-1], None)
        if packet is not None and op._overloadname in packet.overloads():
            return getattr(packet, op._overloadname)
    return op


def _bound(op, args, kwargs) -> dict:
    """An ATen call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def lower_call(op, args, kwargs):
    """(target, args, kwargs) of the torch-level call for one ATen call."""
    op = functional(op)
    if op in (aten.to.device, aten._to_copy.default):
        # device moves are volarray's to make (tiles are on the task's device); keep
        # the dtype cast only
        dtype = _bound(op, args, kwargs).get("dtype")
        return aten.to.dtype, (args[0], dtype) if dtype is not None else (args[0],), {}
    if op in LOWERING:
        fn, names = LOWERING[op]
        bound = _bound(op, args, kwargs)
        return fn, tuple(n.value if isinstance(n, Const) else bound[n] for n in names), {}
    return op, args, kwargs


def lower(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """The exported program as a GraphModule that takes the volume and returns the
    model's output structure (a tensor, a list, a dict), its ops lowered."""
    src = ep.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in src.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":  # export's input-guard function, not the model
            continue
        elif node.op == "call_function":
            if node.target in _DROPPED:
                continue
            target, args, kwargs = lower_call(node.target, node.args, node.kwargs)
            new = graph.create_node("call_function", target,
                                    fx.node.map_arg(args, env.__getitem__),
                                    fx.node.map_arg(kwargs, env.__getitem__),
                                    name=_readable_name(node))
            new.meta = dict(node.meta)
            env[node] = new
        elif node.op == "output":
            flat = [env[a] if isinstance(a, fx.Node) else a for a in node.args[0]]
            graph.output(pytree.tree_unflatten(flat, ep.call_spec.out_spec))
    graph.eliminate_dead_code()
    return fx.GraphModule(src, graph, "Captured")


def innermost_module(node: fx.Node) -> tuple[str, str]:
    """(path, class name) of the module an exported op ran in; ("", "") for ops of the
    model's own forward."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1][:2]
    return path, getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]


def _readable_name(node: fx.Node) -> str:
    """The module path an op ran in (``enc1.3`` -> ``enc1_3``), as fx names module calls;
    the op's name for ops of the model's own forward. fx adds suffixes to repeats."""
    path = innermost_module(node)[0]
    return path.replace(".", "_") if path else node.name


def export_graph(model: nn.Module, input_shape, dtype=torch.float32) -> fx.GraphModule:
    """``model``'s forward on an input of ``input_shape`` (a fake tensor: no memory),
    captured with torch.export and lowered. Extra forward arguments take their
    defaults, as in ``model(x)``. Raises `TraceError` naming the model's line."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .devices import input_device
    from .trace import channel_mismatch, first_line, quiet_fake_tensors, user_frame
    with FakeTensorMode():  # on the model's device: export refuses a mix of devices
        x = torch.empty(tuple(input_shape), dtype=dtype, device=input_device(model))
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_fake_tensors():
            warnings.simplefilter("ignore")  # export's advice, not the user's concern
            ep = torch.export.export(model, (x,), strict=False)
    except Exception as e:
        channel_mismatch(model, input_shape, e)
        raise TraceError(
            f"torch.export could not capture {type(model).__name__} for an input of shape "
            f"{tuple(input_shape)}{user_frame(e)}: {type(e).__name__}: {first_line(e)}") from e
    return lower(ep)


def op_sequence(gm: fx.GraphModule) -> list[str]:
    """The ops a capture calls, in order: two captures of one model at shapes congruent
    modulo its downsampling must call the same ones."""
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
            if n.op == "call_function"]


class AtenCall:
    """An ATen op as a picklable callable (OpOverload objects do not pickle), for tile
    ops that run on workers in other processes."""

    def __init__(self, op):
        self.name, self.overload = op._schema.name.split("::")[1], op._overloadname

    @property
    def op(self):
        return getattr(getattr(aten, self.name), self.overload)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)

    def __repr__(self):
        return f"aten.{self.name}.{self.overload}"
