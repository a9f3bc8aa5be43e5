"""Capture a model with torch.export, as a graph of the torch functions volarray places.

``torch.export`` (non-strict) runs the model's own Python forward on fake tensors, so
control flow resolves exactly as the real forward resolves it: ``isinstance`` guards,
branches on static shapes, ``tuple(x.shape)``, ``round()``, ``torch.as_tensor`` of a
shape. It records one canonical ATen op per call, whatever form the model used
(module, functional, method). `lower` maps each ATen op to the one torch function the
graph builder knows for it, with the arguments in that function's order (the
``lowering`` of the op's registration in `volarray.ops.table`); ops without one stay
ATen ops, and the builder places those tagged pointwise as they are. torch.fx's
capture (`symbolic_trace`) serves where export cannot capture a model.

Shapes are concrete: a capture holds for one input shape. Whole-volume captures run on
fake tensors, so capturing a 4096^3 volume costs nothing.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
import warnings
import weakref

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from . import devices
from .diagnostics import channel_mismatch, first_line, quiet_fake_tensors, user_frame
from .errors import TraceError
from .layout import fuse_channels_last
from .modelcall import model_dtype, pick_output
from .ops.registry import Const
from .ops.table import OPS

aten = torch.ops.aten


PROGRESS = logging.getLogger("volarray.progress")


@contextlib.contextmanager
def phase(name: str, detail: str = ""):
    """Report a phase of a run on the ``volarray.progress`` logger: one INFO line as it
    starts (``tracing``, ``checking``, ``planning``; the command line's bar says
    ``computing``), one DEBUG line with its seconds as it ends. Silent unless a handler
    is set up, as the command line does when not --quiet."""
    PROGRESS.info("%s%s", name, f" {detail}" if detail else "")
    start = time.perf_counter()
    try:
        yield
    finally:
        PROGRESS.debug("%s took %.2f s", name, time.perf_counter() - start)


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
    if op in OPS.lowerings:
        fn, names = OPS.lowerings[op]
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
    with FakeTensorMode():  # on the model's device: export refuses a mix of devices
        x = torch.empty(tuple(input_shape), dtype=dtype, device=devices.input_device(model))
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


# ------------------------------------------------------------------ torch.fx
def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``model`` captured with torch.fx (no shapes: one graph for every input), its
    extra forward arguments fixed at their defaults."""
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
            "line static, or run method='window', which calls the model as it is") from e
    _drop_string_annotations(gm)
    return _drop_constant_inputs(gm, constants) if constants else gm


def _drop_string_annotations(gm: fx.GraphModule) -> None:
    """A forward written under ``from __future__ import annotations`` (MONAI's UNet,
    SegResNet, AttentionUnet) gives fx type annotations that are strings; its generated
    code then holds one as a global ('torch.Tensor'), and the GraphModule does not
    pickle: a distributed cluster's workers never got the task graph. The annotations
    are only comments in that code."""
    annotated = [n for n in gm.graph.nodes if isinstance(n.type, str)]
    for n in annotated:
        n.type = None
    if annotated:
        gm.recompile()


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


# ------------------------------------------------------------------ captures
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


def fx_capture(model: nn.Module, select=None) -> fx.GraphModule:
    """``model`` captured with torch.fx, in-place calls made explicit, channels-last
    chains fused, reduced to the output ``select`` picks."""
    return select_output(fuse_channels_last(functionalize(symbolic_trace(model))), select)


# ops whose result may share its input's memory (a view, or the input itself): a write
# into one changes the other
ALIAS_OPS = {"view", "view_as", "reshape", "reshape_as", "narrow", "select", "transpose",
             "t", "permute", "expand", "expand_as", "squeeze", "unsqueeze", "flatten",
             "unflatten", "split", "chunk", "unbind", "movedim", "swapaxes", "as_strided",
             "detach", "contiguous", "getitem", "__getitem__", "diagonal", "unfold",
             "float", "half", "double", "bfloat16", "to", "type", "type_as", "cpu", "cuda",
             "requires_grad_"}
ALIAS_ATTRIBUTES = {"data", "T", "mT", "H", "mH", "real"}  # x.shape is no alias
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def mutates_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument: a module with ``inplace=True``
    (nn.ReLU(inplace=True)), a function called with ``inplace=True``, a method or
    function whose name ends in ``_`` (``x.relu_()``, ``torch.relu_(x)``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op in ("call_method", "call_function"):
        name = _name(node)
        return bool(node.kwargs.get("inplace")) or (name.endswith("_")
                                                     and not name.startswith("_"))
    return False


def may_alias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s result may share memory with its first input: a view, a
    cast that may return its input, a pass-through module, or an in-place call."""
    if node.op in ("call_method", "call_function"):
        if _name(node) == "getattr":
            return len(node.args) > 1 and node.args[1] in ALIAS_ATTRIBUTES
        return _name(node) in ALIAS_OPS or mutates_input(gm, node)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ALIAS_MODULES) \
            or mutates_input(gm, node)
    return False


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """torch.fx records an in-place call as a node, and later readers of the tensor it
    wrote still read the node before it. Tiles run every op out of place (a tile may be
    a view of rows a sweep keeps), so those readers would see the value before the
    write: nn.InstanceNorm3d then ReLU(inplace=True), then the norm's output read again,
    gave the un-rectified values. Here every reader after an in-place node reads that
    node instead, as torch.export's functionalization does. Where the written tensor
    may share memory with another that is read after the write (a view, an
    ``nn.Identity``, a ``.float()`` of a float tensor, its base or another view of
    it), the write cannot be followed and the capture is refused: torch.export
    captures such a model."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for node in list(gm.graph.nodes):
        if not mutates_input(gm, node) or not node.args or not isinstance(node.args[0],
                                                                           fx.Node):
            continue
        target = node.args[0]
        # tensors made before the write that may share its memory (made after it, they
        # are made from the written value, below)
        shared = {n for n in _sharing(gm, target) - {target} if order[n] < order[node]}
        if any(order[u] > order[node] for n in shared for u in n.users):
            raise TraceError(f"{node.name} writes in place into {target.name}, which shares "
                             "memory with a tensor read after the write; torch.fx cannot "
                             "follow that write")
        for user in list(target.users):
            if order[user] > order[node]:
                user.replace_input_with(target, node)
                changed = True
    if changed:
        gm.recompile()
    return gm


def _sharing(gm: fx.GraphModule, node: fx.Node) -> set:
    """``node`` and every node that may share its memory: up through the aliasing ops
    that made it, then down through the aliasing ops made from any of those."""
    root = node
    while may_alias(gm, root) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    found, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        stack.extend(u for u in n.users if may_alias(gm, u) and u.args and u.args[0] is n)
    return found
