"""The captured graph is the model: a probe self-check refuses any capture that
differs from the model's own forward; forward arguments after the volume take their
defaults; several outputs are picked by select=."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import volarray
from volarray.errors import TraceError
from volarray.selfcheck import probe_shape
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


class IsinstanceGuard(nn.Module):
    """A residual add behind isinstance(): fx sees a Proxy there and drops the add."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 4, 3, padding=1)
        self.c = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        skip, out = self.b(h), self.c(h)
        if isinstance(skip, torch.Tensor):
            out = out + skip
        return out


class GuardedModuleCall(IsinstanceGuard):
    def forward(self, x):
        h = self.a(x)
        if isinstance(h, torch.Tensor):
            h = self.b(h)
        return self.c(h)


def test_isinstance_guard_is_exact_never_wrong():
    """torch.export runs the forward's Python as it is: the guard takes the branch the
    real forward takes. torch.fx (the fallback capture) takes the other one, and its
    self-check refuses it, naming the module after which the two part."""
    from volarray.trace import _trace_fx
    torch.manual_seed(0)
    vol = random_volume((12, 20, 9))
    for model in (IsinstanceGuard().eval(), GuardedModuleCall().eval()):
        y = volarray.predict(model, vol, chunks=(6, 8, 5)).compute()
        assert_volume_close(y, whole_volume(model, vol))
    shape = (1, 1) + vol.shape
    with pytest.raises(volarray.TraceError, match=r"after module 'c'.*method='window'"):
        _trace_fx(IsinstanceGuard().eval(), shape, None, torch.float32)
    with pytest.raises(volarray.TraceError, match="calls module 'c' where the forward calls 'b'"):
        _trace_fx(GuardedModuleCall().eval(), shape, None, torch.float32)


class SizeBranch(nn.Module):
    """A branch on the input's size that a small probe does not take."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 2, 3, padding=1)
        self.big = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        if x.shape[2] > 40:
            h = self.big(h)
        return h


def test_a_branch_the_probe_cannot_check_is_refused():
    vol = random_volume((48, 10, 9))
    with pytest.raises(volarray.TraceError, match="other ops at the volume's shape.*'big'"):
        volarray.predict(SizeBranch().eval(), vol)


class StaticShapeOps(nn.Module):
    """What fx cannot capture: a branch on a static shape, tuple(x.shape), round(),
    a crop by slicing, channel padding (HighResNet's residuals)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 3, 3, padding=1)
        self.down = nn.Conv3d(3, 3, 3, stride=2, padding=1)
        self.b = nn.Conv3d(5, 2, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        size = tuple(h.shape[2:])
        d = self.down(h)
        if d.shape[2] % 2:
            d = F.pad(d, (0, 0, 0, 0, 0, 1))
        up = F.interpolate(d, size=tuple(round(s) for s in size), mode="trilinear")
        h = torch.cat([h, up[:, :2]], 1)
        h = self.b(h)[:, :, 1:-1, 2:]
        return F.pad(h, (0, 0, 0, 0, 0, 0, 1, 0))


def test_static_shapes_crops_and_channel_padding():
    torch.manual_seed(5)
    model = StaticShapeOps().eval()
    for shape, chunks in (((13, 18, 11), (5, 7, 4)), ((14, 17, 12), (6, 8, 5))):
        vol = random_volume(shape)
        y = volarray.predict(model, vol, chunks=chunks).compute()
        assert y.shape[1:] == (shape[0] - 2, shape[1] - 2, shape[2])
        assert_volume_close(y, whole_volume(model, vol))


class TorchseisStyle(nn.Module):
    """torchseis' networks take forward(x, rank=0); GEM forward(x, prompt=None)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x, rank=0, prompt=None):
        if rank == 0 and prompt is None:
            return torch.sigmoid(self.up(self.pool(self.conv(x))))
        return x


def test_forward_arguments_take_their_defaults():
    torch.manual_seed(1)
    model, vol = TorchseisStyle().eval(), random_volume((12, 18, 10))
    y = volarray.predict(model, vol, chunks=(6, 8, 4)).compute()
    assert_volume_close(y, whole_volume(model, vol))

    class TwoInputs(nn.Module):
        def forward(self, x, mask):
            return x * mask
    with pytest.raises(volarray.TraceError, match="second input 'mask'"):
        volarray.predict(TwoInputs().eval(), vol)


class DeepSupervision(nn.Module):
    """nnU-Net's convention: a list of outputs, full resolution first."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.enc = nn.Conv3d(1, 4, 3, padding=1)
        self.down = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.full = nn.Conv3d(4, 3, 1)
        self.coarse = nn.Conv3d(4, 3, 1)

    def forward(self, x):
        h = torch.relu(self.enc(x))
        outs = [self.full(h), self.coarse(torch.relu(self.down(h)))]
        return {"seg": outs[0], "aux": outs[1]} if self.as_dict else outs


@pytest.mark.parametrize("mode", ["exact", "window"])
def test_several_outputs_select_one(mode):
    torch.manual_seed(2)
    vol = random_volume((12, 16, 10), seed=3)
    kw = {"method": mode, "chunks": (6, 8, 10)}
    if mode == "window":
        kw["roi_size"] = vol.shape
    model = DeepSupervision().eval()
    with torch.inference_mode():
        ref = model(torch.from_numpy(vol)[None, None])[0][0].numpy()
    assert_volume_close(volarray.predict(model, vol, **kw).compute(), ref)  # first: default
    assert_volume_close(volarray.predict(model, vol, select=0, **kw).compute(), ref)
    with pytest.raises(volarray.InputError, match="index from 0 to 1"):
        volarray.predict(model, vol, select=5, **kw)
    named = DeepSupervision(as_dict=True).eval()
    named.load_state_dict(model.state_dict(), strict=False)
    with pytest.raises(volarray.InputError, match=r"keys \['seg', 'aux'\]"):
        volarray.predict(named, vol, **kw)
    y = volarray.predict(named, vol, select="seg", **kw).compute()
    assert_volume_close(y, ref)


def test_probe_is_congruent_to_the_volume():
    assert probe_shape((100, 37, 8), (8, 4, 1)) == (20, 17, 8)
    for side, a in ((100, 8), (37, 4), (5, 2), (64, 16)):
        p = probe_shape((side,), (a,))[0]
        assert p % a == side % a and p <= side


def test_probe_grows_when_the_model_needs_more():
    """InstanceNorm after downsampling by 16 fails on one voxel; the probe grows, the
    volume is fine."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(16),
                          nn.InstanceNorm3d(2), nn.Upsample(scale_factor=16)).eval()
    vol = random_volume((48, 32, 32), seed=4)
    y = volarray.predict(model, vol, chunks=(16, 32, 16)).compute()
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


class BroadcastFirst(nn.Module):
    """A global mean broadcast back as the first op of a stage (Bi21RGT3d's attention
    gates): it used to fail inside volarray with an UnboundLocalError."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(8, 2, 3, padding=1)

    def forward(self, x):
        h = self.a(x)
        s = h.mean((2, 3, 4), keepdim=True)
        return self.b(torch.cat([s.expand_as(h), h], 1))


def test_broadcast_global_value_first_in_a_stage():
    torch.manual_seed(0)
    model, vol = BroadcastFirst().eval(), random_volume((12, 14, 10), seed=6)
    y = volarray.predict(model, vol, chunks=(6, 7, 5)).compute()
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7^3 conv, then channels last: LayerNorm, Linear, GELU, Linear, layer
    scale, and channels first again (ConvNeXt, MedNeXt)."""

    def __init__(self, c=4, reduce_z=False):
        super().__init__()
        self.reduce_z = reduce_z
        self.dw = nn.Conv3d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 4, 1)
        h = self.gamma * self.pw2(self.act(self.pw1(self.ln(h))))
        if self.reduce_z:  # not per voxel: a mean over z, with channels last
            h = h - h.mean(1, keepdim=True)
        return x + h.permute(0, 4, 1, 2, 3)


def test_channels_last_blocks_and_prelu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.PReLU(4), ConvNeXtBlock(),
                          nn.Conv3d(4, 2, 1)).eval()
    vol = random_volume((10, 12, 9), seed=2)
    y = volarray.predict(model, vol, chunks=(5, 7, 4)).compute()
    assert_volume_close(y, whole_volume(model, vol))
    odd = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), ConvNeXtBlock(reduce_z=True)).eval()
    with pytest.raises(volarray.UnsupportedOpError, match="permute"):
        volarray.predict(odd, vol)


class WritesInPlace(nn.Module):
    """Every form of in-place write, each followed by a read of the tensor written:
    the reader sees the value after the write, as in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.norm = nn.InstanceNorm3d(3, affine=True)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.head = nn.Conv3d(3, 1, 1)

    def forward(self, x):
        y = self.norm(self.conv(x))
        a = self.head(self.act(y))  # module, in place
        b = F.elu(y, 0.5, True)  # function, inplace=True
        c = (y * 1.5).sigmoid_()  # a method ending in _, on a fresh tensor
        y.mul_(2.0)  # a method ending in _ (b, an alias of y, changes too)
        return a + b + c + y


class WritesIntoAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y[:, :1].relu_()  # into a view: y changes too
        return y


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_in_place_writes_are_seen_by_later_readers(capture):
    """A silent wrong answer before: torch.fx's graph let the norm's later readers read
    it before the in-place LeakyReLU wrote into it (max error 3.0)."""
    torch.manual_seed(0)
    model = WritesInPlace().eval()
    if capture == "export":  # a submodule hook sends the capture to torch.export
        model.conv.register_forward_hook(lambda module, args, out: None)
    vol = random_volume((12, 10, 9), seed=3)
    want = whole_volume(model, vol)
    y = volarray.predict(model, vol, chunks=(6, 5, 9)).compute(scheduler="sync")
    assert_volume_close(y, want, atol=1e-5)
    assert model.act.inplace  # the model's own module is left as it was


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_an_in_place_write_into_a_view_is_refused_not_lost(capture):
    """Neither capture follows a write into a view to its base: refused, not wrong."""
    torch.manual_seed(0)
    model = WritesIntoAView().eval()
    if capture == "export":
        model.conv.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(TraceError):
        volarray.predict(model, random_volume((12, 10, 9), seed=3), chunks=(6, 5, 9))


def test_an_inplace_module_runs_out_of_place_without_a_clone(monkeypatch):
    """An in-place torch.nn activation runs as its out-of-place copy (one pass, no
    clone of its input); the model's own module keeps inplace=True."""
    import volarray.ops.calls as CALLS
    torch.manual_seed(0)
    model = WritesInPlace().eval()
    vol = random_volume((12, 10, 9), seed=3)
    copies = []
    real = CALLS.out_of_place
    monkeypatch.setattr(CALLS, "out_of_place", lambda m: copies.append(m) or real(m))
    y = volarray.predict(model, vol, chunks=(6, 5, 9)).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)
    assert copies and all(m is model.act for m in copies)
    assert model.act.inplace and not real(model.act).inplace
    # made per call: a slope changed between runs is the one used
    model.act.negative_slope = 0.01
    y = volarray.predict(model, vol, chunks=(6, 5, 9)).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


class StringAnnotated(nn.Module):
    """A forward annotated with strings, as under ``from __future__ import annotations``
    (MONAI's UNet, SegResNet, AttentionUnet)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        y: "torch.Tensor" = self.conv(x)
        return y.relu()


def test_a_string_annotated_capture_pickles_for_cluster_workers():
    """fx kept the string annotation as a global of the generated code ('torch.Tensor'),
    and the GraphModule did not pickle: on a distributed cluster MONAI's UNet,
    SegResNet and AttentionUnet failed before any task ran."""
    import pickle

    import cloudpickle

    from volarray.capture import fx_capture
    gm = fx_capture(StringAnnotated().eval())
    cloudpickle.dumps(gm)
    x = torch.randn(1, 1, 4, 5, 6)
    torch.testing.assert_close(pickle.loads(pickle.dumps(gm))(x), gm(x))


class WritesThroughIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.idn = nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        self.idn(y).relu_()  # nn.Identity returns y itself: y is rectified
        return y


class WritesThroughACast(WritesThroughIdentity):
    def forward(self, x):
        y = self.conv(x)
        F.relu(y.float(), inplace=True)  # .float() of a float tensor is the tensor
        return y * 2


class WritesIntoTheBaseOfAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        a = y[:, 1:3]
        y.relu_()  # a, a view of y, is rectified too
        return a


@pytest.mark.parametrize("model_class", [WritesThroughIdentity, WritesThroughACast])
def test_a_write_through_an_alias_is_left_to_torch_export(model_class):
    """torch.fx cannot tell that these write into a tensor read later (max error 1.8
    once): its capture is refused, and torch.export's gives the model's answer."""
    from volarray.trace import fast_trace
    torch.manual_seed(0)
    model = model_class().eval()
    assert fast_trace(model, (1, 1, 12, 10, 9), None, torch.float32) is None
    vol = random_volume((12, 10, 9), seed=3)
    y = volarray.predict(model, vol, chunks=(6, 5, 9)).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


def test_a_write_into_the_base_of_a_view_read_later_is_refused():
    with pytest.raises(TraceError):
        volarray.predict(WritesIntoTheBaseOfAView().eval(), random_volume((12, 10, 9)),
                         chunks=(6, 5, 9))
