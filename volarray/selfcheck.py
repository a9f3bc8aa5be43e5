"""The captured graph must be the model: a check on a small probe input, always on.

torch.fx records one path through ``forward``; Python control flow that looks at a
traced value (``isinstance(skip, torch.Tensor)`` on what fx sees as a Proxy) can take
another branch than the real forward does, and the graph would silently compute
something else. So before anything is planned, the captured graph and the model run
on the same small input, congruent to the volume's shape modulo the network's
downsampling, and must agree; otherwise `TraceError` names the first module whose
output differs, or the module after which they part.
"""
from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn as nn

from .errors import TraceError

PROBE_MIN_SIDE = 16
PROBE_MAX_VOXELS = 128 ** 3  # a probe grows (when the model fails on it) up to this
TOLERANCE = 2e-5  # times max(1, max |y|)
_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def probe_shape(shape, align) -> tuple[int, ...]:
    """Per axis, the smallest side >= PROBE_MIN_SIDE (or the side itself, when
    smaller) that is congruent to it modulo the axis' downsampling."""
    out = []
    for side, a in zip(shape, align):
        a = max(int(a), 1)
        p = side % a
        while p < min(PROBE_MIN_SIDE, side) or p == 0:
            p += a
        out.append(min(p, side))
    return tuple(out)


@contextlib.contextmanager
def one_thread():
    """Torch's intra-op threads of this thread set to one inside the block (a probe is
    a few thousand voxels: on a busy machine two spinning threads made it 5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_capture(model: nn.Module, gm, in_channels: int, shape, align, dtype,
                  pick=lambda y: y, recapture=None) -> None:
    """Raise TraceError when ``gm`` (the capture of ``model``) computes something
    else than ``pick(model(x))`` on a probe input. Each model is checked once per probe
    shape and capture.

    ``recapture(input_shape)``, for captures specialized to one shape (torch.export):
    the model is captured again at the probe shape; that capture must call the same
    ops as ``gm`` and agree with the model on the probe."""
    spatial = probe_shape(shape, align)
    key = ((1, in_channels) + spatial, gm.code)
    done = _checked.setdefault(model, set())
    if key in done:
        return
    from .capture import phase
    with phase("checking", f"the capture against the model on a {spatial} probe"):
        _check(model, gm, in_channels, shape, align, dtype, pick, recapture, spatial)
    done.add(key)


def _check(model, gm, in_channels, shape, align, dtype, pick, recapture, spatial) -> None:
    # the modules fx calls as wholes (its leaves), recorded in both runs
    tracer = torch.fx.Tracer()
    leaves = {m for name, m in model.named_modules() if tracer.is_leaf_module(m, name)}
    from .devices import input_device
    device = input_device(model)  # the probe runs where the model is, in its dtype
    while True:  # a probe too small for the model itself (a norm over 1 voxel) grows
        probe = (1, in_channels) + spatial
        x = torch.randn(probe, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        try:
            want, want_modules = _run_recording(model, model, x, leaves)
            break
        except Exception as e:
            grown = tuple(min(p + max(int(a), 1), s) for p, s, a in zip(spatial, shape, align))
            if grown == spatial or math.prod(grown) > PROBE_MAX_VOXELS:
                raise TraceError(f"{type(model).__name__}'s own forward fails on a probe input "
                                 f"of shape {probe}: {type(e).__name__}: {e}") from e
            spatial = grown
    want = pick(want)
    if recapture is not None:
        probe_gm = recapture(probe)
        _same_ops(model, gm, probe_gm, probe)
        gm = probe_gm
    try:
        got, got_modules = (_run_by_module(gm, x) if recapture is not None
                            else _run_recording(model, gm, x, leaves))
    except Exception as e:
        raise TraceError(f"the graph torch.fx captured from {type(model).__name__} fails on a "
                         f"probe input of shape {probe} where the model's own forward runs "
                         f"({type(e).__name__}: {e}); the capture took another path through "
                         "forward: run method='window', which calls the model as it is") from e
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
        return  # several outputs: the graph builder says what it supports
    scale = max(1.0, float(want.abs().max()))
    diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
    if diff <= TOLERANCE * scale:
        return
    raise TraceError(
        f"the graph torch.fx captured from {type(model).__name__} differs from its own forward "
        f"on a {tuple(probe[2:])} probe input (max difference {diff:.3g}, max |y| "
        f"{scale:.3g}): {_where(want_modules, got_modules)}. Python control flow in forward "
        "that looks at a tensor (isinstance(..., torch.Tensor), a branch on a value) is "
        "resolved once at capture; make it static, or run method='window', which calls the "
        "model as it is")


def _same_ops(model, gm, probe_gm, probe) -> None:
    from .capture import innermost_module, op_sequence
    ops, probe_ops = op_sequence(gm), op_sequence(probe_gm)
    if ops == probe_ops:
        return
    i = next((i for i, (a, b) in enumerate(zip(ops, probe_ops)) if a != b),
             min(len(ops), len(probe_ops)))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    where = innermost_module(nodes[i])[0] if i < len(nodes) else "the end"
    raise TraceError(
        f"{type(model).__name__} calls other ops at the volume's shape than at a congruent "
        f"{tuple(probe[2:])} probe (op {i}: {ops[i] if i < len(ops) else 'none'} against "
        f"{probe_ops[i] if i < len(probe_ops) else 'none'}, in '{where}'): its forward "
        "branches on the input's size in a way the probe cannot check; run method='window', "
        "which calls the model as it is")


def _run_by_module(gm, x):
    """For an exported capture (no module calls left): ``gm(x)``, and each module path's
    output, as the value of the last node recorded inside it; the same seed as
    `_run_recording`."""
    from .capture import innermost_module
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            path = innermost_module(n)[0]
            if path and isinstance(v, torch.Tensor):
                values[path] = v.detach().clone()
            return v
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), one_thread():
        torch.manual_seed(0)
        y = Recorder(gm).run(x)
    return y, values


def _run_recording(model: nn.Module, runner, x, leaves):
    """``runner(x)`` with the output of every module in ``leaves`` recorded, in call
    order, as (module path, output); the same seed for any random draws in both runs."""
    names = {}
    for name, m in model.named_modules():
        if m in leaves:
            names.setdefault(m, name or type(model).__name__)
    calls = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            calls.append((names[module], output.detach().clone()))
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), one_thread():
            torch.manual_seed(0)
            y = runner(x)
    finally:
        for h in handles:
            h.remove()
    return y, calls


def _where(want_modules, got_modules) -> str:
    """The first module whose output differs between the two runs, or the last one
    on which they agree. ``got_modules``: a list in call order, or a dict by module path
    (an exported capture, which has no module calls)."""
    last_same = None
    if isinstance(got_modules, dict):
        for wn, wv in want_modules:
            gv = got_modules.get(wn)
            if gv is None:
                continue
            if gv.shape != wv.shape or float((wv - gv).abs().max()) > TOLERANCE * max(
                    1.0, float(wv.abs().max())):
                return f"the output of module '{wn}' differs first"
            last_same = wn
        where = f"after module '{last_same}'" if last_same else "before any module"
        return f"every module agrees; an op {where} does not"
    for (wn, wv), (gn, gv) in zip(want_modules, got_modules):
        if wn != gn:
            return (f"the capture calls module '{gn}' where the forward calls '{wn}' (after "
                    f"module '{last_same}')" if last_same else
                    f"the capture calls module '{gn}' first, the forward '{wn}'")
        if wv.shape != gv.shape or float((wv - gv).abs().max()) > TOLERANCE * max(
                1.0, float(wv.abs().max())):
            return f"the output of module '{wn}' differs first"
        last_same = wn
    if len(want_modules) != len(got_modules):
        return (f"the forward calls {len(want_modules)} modules, the capture "
                f"{len(got_modules)}, agreeing up to module '{last_same}'")
    where = f"after module '{last_same}'" if last_same else "before any module"
    return f"every module agrees; a function or tensor method {where} does not"
