"""Every local op of the table, alone, on odd shapes and chunks smaller than its halo."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import volarray
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


class Fn(nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.fn = fn
        self.m = nn.ModuleList(mods)

    def forward(self, x):
        return self.fn(self, x)


OPS = {
    "conv-zeros": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 3, 3, padding=1)),
    "conv-reflect": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3, padding=1, padding_mode="reflect")),
    "conv-replicate-dilated": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3, padding=2, dilation=2, padding_mode="replicate")),
    "conv-circular": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3, padding=1, padding_mode="circular")),
    "conv-stride2": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3, stride=2, padding=1)),
    "conv-stride-anisotropic": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, (3, 5, 2), stride=(1, 2, 3), padding=(1, 2, 0))),
    "conv-same-even-kernel": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 4, padding="same")),
    "conv-same-dilated": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3, padding="same", dilation=3)),
    "conv-valid": lambda: Fn(lambda s, x: s.m[0](x), nn.Conv3d(1, 2, 3)),
    "conv-groups": lambda: Fn(lambda s, x: s.m[1](s.m[0](x)), nn.Conv3d(1, 4, 1), nn.Conv3d(4, 4, 3, padding=1, groups=2)),
    "F.conv3d": lambda: Fn(lambda s, x: F.conv3d(x, s.m[0].weight, s.m[0].bias, padding=1), nn.Conv3d(1, 2, 3)),
    "convtranspose-k2s2": lambda: Fn(lambda s, x: s.m[0](x), nn.ConvTranspose3d(1, 2, 2, stride=2)),
    "convtranspose-k3s2-outpad": lambda: Fn(lambda s, x: s.m[0](x), nn.ConvTranspose3d(1, 2, 3, stride=2, padding=1, output_padding=1)),
    "convtranspose-k3s1": lambda: Fn(lambda s, x: s.m[0](x), nn.ConvTranspose3d(1, 2, 3, padding=1)),
    "convtranspose-dilated": lambda: Fn(lambda s, x: s.m[0](x), nn.ConvTranspose3d(1, 2, 3, stride=2, dilation=2)),
    "maxpool2": lambda: Fn(lambda s, x: s.m[0](x), nn.MaxPool3d(2)),
    "maxpool-padded-ceil": lambda: Fn(lambda s, x: F.max_pool3d(x, 3, stride=2, padding=1, ceil_mode=True)),
    "maxpool-dilated": lambda: Fn(lambda s, x: s.m[0](x), nn.MaxPool3d(2, stride=1, dilation=2)),
    "avgpool-exclude-pad": lambda: Fn(lambda s, x: s.m[0](x), nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False)),
    "avgpool-include-pad-ceil": lambda: Fn(lambda s, x: s.m[0](x), nn.AvgPool3d(3, stride=2, padding=1, ceil_mode=True)),
    "avgpool-divisor": lambda: Fn(lambda s, x: F.avg_pool3d(x, 2, divisor_override=3)),
    "nearest-x2": lambda: Fn(lambda s, x: s.m[0](x), nn.Upsample(scale_factor=2)),
    "nearest-size": lambda: Fn(lambda s, x: F.interpolate(x, size=(20, 31, 17))),
    "nearest-exact-x3": lambda: Fn(lambda s, x: F.interpolate(x, scale_factor=3, mode="nearest-exact")),
    "trilinear-x2": lambda: Fn(lambda s, x: F.interpolate(x, scale_factor=2, mode="trilinear")),
    "trilinear-x2-align": lambda: Fn(lambda s, x: s.m[0](x), nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)),
    "trilinear-size": lambda: Fn(lambda s, x: F.interpolate(x, size=(20, 31, 17), mode="trilinear")),
    "trilinear-size-align": lambda: Fn(lambda s, x: F.interpolate(x, size=(20, 31, 17), mode="trilinear", align_corners=True)),
    "trilinear-down": lambda: Fn(lambda s, x: F.interpolate(x, size=(6, 8, 5), mode="trilinear")),
    "pad-reflect": lambda: Fn(lambda s, x: F.pad(x, (1, 2, 0, 1, 2, 1), mode="reflect")),
    "pad-constant": lambda: Fn(lambda s, x: F.pad(x, (3, 0, 1, 1, 0, 2), value=0.5)),
    "pad-module-replicate": lambda: Fn(lambda s, x: s.m[0](x), nn.ReplicationPad3d((1, 2, 3, 0, 2, 1))),
    "pointwise-mix": lambda: Fn(lambda s, x: torch.clamp(x * 2 - 1, -1.5, 1.5).tanh() + F.elu(x).abs()),
    "channel-softmax": lambda: Fn(lambda s, x: torch.softmax(s.m[0](x), dim=1), nn.Conv3d(1, 4, 3, padding=1)),
    "bn-prelu-dropout": lambda: Fn(lambda s, x: s.m[2](s.m[1](s.m[0](x))), nn.Conv3d(1, 3, 1), nn.BatchNorm3d(3), nn.PReLU(3)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_exact(name):
    torch.manual_seed(0)
    model = OPS[name]().eval()
    vol = random_volume((11, 15, 9))
    ref = whole_volume(model, vol)
    for chunks in [(4, 5, 3), (11, 15, 9), (1, 7, 2)]:
        out = volarray.predict(model, vol, chunks=chunks).compute(scheduler="sync")
        assert_volume_close(out, ref, atol=1e-5)


class Small(nn.Module):
    """A little encoder-decoder mixing strides, dilation and trilinear upsampling."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.c = nn.Conv3d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect")
        self.d = nn.Conv3d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.relu(self.c(F.relu(self.b(a))))
        up = F.interpolate(b, size=a.shape[2:], mode="trilinear", align_corners=False)
        return self.d(torch.cat([a, up], 1))


@settings(max_examples=12, deadline=None)
@given(shape=st.tuples(*[st.integers(5, 17)] * 3), chunks=st.tuples(*[st.integers(1, 9)] * 3))
def test_random_shapes_and_chunks(shape, chunks):
    torch.manual_seed(1)
    model = Small().eval()
    vol = random_volume(shape, seed=sum(shape))
    out = volarray.predict(model, vol, chunks=chunks).compute(scheduler="sync")
    assert_volume_close(out, whole_volume(model, vol), atol=1e-5)
