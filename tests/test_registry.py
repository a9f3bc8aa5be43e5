"""The op registry: lookup rules, and an op added in one module (torch.flip)."""
import contextlib
import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import volarray
from volarray.ops.flip import Flip
from volarray.ops.registry import Registry
from volarray.ops.table import OPS
from volarray.testing import assert_volume_close
from volarray.trace import trace

from conftest import random_volume, whole_volume

import volarray.costing as PLAN


# ---------------------------------------------------------------- lookup
class MyConv(nn.Conv3d):
    """A subclass finds its base's builder along the MRO."""


def _node(op, target):
    return fx.Graph().create_node(op, target, (), {})


def test_lookup_by_module_class_along_the_mro():
    assert OPS.lookup(_node("call_module", "c"), MyConv(1, 1, 3)) is OPS.by_module[nn.Conv3d]
    assert OPS.lookup(_node("call_module", "f"), nn.Flatten()) is None


def test_lookup_by_function_method_and_the_pointwise_rule():
    aten = torch.ops.aten
    assert OPS.lookup(_node("call_function", F.conv3d)) is OPS.by_function[F.conv3d]
    assert OPS.lookup(_node("call_method", "flip")) is OPS.by_function[torch.flip]
    assert OPS.lookup(_node("call_function", aten.hardtanh.default)) is not None  # tagged
    assert OPS.lookup(_node("call_function", aten.cumsum.default)) is None


def test_one_key_one_builder():
    reg = Registry()
    reg.register(len, functions=[max])
    reg.register(len, functions=[max])  # the same builder again: fine
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(abs, functions=[max])


# ---------------------------------------------------------------- torch.flip
class ConvFlipConv(nn.Module):
    def __init__(self, dims, method=False):
        super().__init__()
        self.dims, self.method = dims, method
        self.a = nn.Conv3d(1, 3, 3, padding=1)
        self.b = nn.Conv3d(3, 2, (3, 5, 1), padding=(1, 2, 0), padding_mode="reflect")

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y.flip(*self.dims) if self.method else torch.flip(y, dims=self.dims)
        return self.b(y)


@pytest.mark.parametrize("dims", [(2,), (2, 4), (-1, 1)])
def test_flip_equals_the_whole_volume_forward(dims):
    torch.manual_seed(0)
    model = ConvFlipConv(dims).eval()
    vol = random_volume((13, 11, 9), seed=4)
    graph = trace(model, (1, 1) + vol.shape)
    flips = [n.op for n in graph.nodes.values() if isinstance(n.op, Flip)]
    assert flips and flips[0].dims == tuple(sorted(d % 5 for d in dims))
    ref = whole_volume(model, vol)
    for chunks in [(5, 4, 7), (13, 11, 9), (2, 7, 3)]:
        for scheduler in ("threads", "sync"):
            out = volarray.predict(model, vol, chunks=chunks).compute(scheduler=scheduler)
            assert_volume_close(out, ref, atol=1e-5)


def test_flip_method_through_torch_fx():
    """x.flip(2, 3) as torch.fx captures it (a call_method)."""
    from volarray.trace import _trace_fx
    model = ConvFlipConv((2, 3), method=True).eval()
    vol = random_volume((9, 10, 7), seed=5)
    graph = _trace_fx(model, (1, 1) + vol.shape, None, torch.float32)
    assert any(isinstance(n.op, Flip) for n in graph.nodes.values())
    out = volarray.predict(model, vol, chunks=(4, 3, 7)).compute(scheduler="sync")
    assert_volume_close(out, whole_volume(model, vol), atol=1e-5)


def test_flip_along_z_in_a_swept_task(monkeypatch):
    """Slabs along a flipped z read their input backwards: the rows a node keeps for
    the next slab are of no use, and are recomputed."""
    def thinnest(graph, stage, shapes, target, unit, limit=None):
        if stage.chunk_shape[0] <= unit or not stage.program.order:
            return stage
        thin = dataclasses.replace(stage, slab=unit,
                                   peak_bytes=PLAN.sweep_bytes(graph, stage, shapes, unit)[1])
        with contextlib.suppress(dataclasses.FrozenInstanceError):  # a planner that
            stage.slab, stage.peak_bytes = thin.slab, thin.peak_bytes  # keeps the stage
        return thin
    monkeypatch.setattr(PLAN, "choose_slab", thinnest)
    torch.manual_seed(1)
    model = ConvFlipConv((2,)).eval()
    vol = random_volume((17, 6, 5), seed=6)
    plan = volarray.plan(model, vol, chunks=(17, 6, 5), keep=0)
    assert plan.stages[0].slab is not None, str(plan)
    out = volarray.predict(model, vol, chunks=(17, 6, 5), keep=0).compute(scheduler="sync")
    assert_volume_close(out, whole_volume(model, vol), atol=1e-5)


# ---------------------------------------------------------------- monotone heads
@pytest.mark.parametrize("head,fused", [
    (lambda y: torch.softmax(y, dim=1), True), (torch.sigmoid, True),
    (lambda y: F.log_softmax(y, 1).clone(), True), (nn.Softmax(dim=1), True),
    (torch.neg, False), (nn.Softmin(dim=1), False)])
def test_argmax_head_skips_increasing_ops_only(head, fused):
    """Ops increasing in each channel's score keep the argmax: the classifier conv
    absorbs them; any other op stops the fusion."""
    from volarray.ops.conv import fuse_argmax_head

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv3d(1, 4, 3, padding=1), head

        def forward(self, x):
            return self.head(self.conv(x))
    graph = trace(Net().eval(), (1, 1, 6, 7, 5))
    assert (fuse_argmax_head(graph) is not None) is fused  # a new graph, or None
