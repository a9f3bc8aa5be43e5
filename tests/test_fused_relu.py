"""A conv whose only reader is a ReLU runs the ReLU in its own kernel (oneDNN's fused
post-op on CPU): one pass over the tile less, the same numbers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import volarray
import volarray.ops.conv as CONV
from volarray.models import FaultSeg3D, seeded
from volarray.testing import assert_volume_close

from conftest import random_volume, whole_volume


class Forms(nn.Module):
    """ReLU in every form, a conv read twice (not fused), and a LeakyReLU (not fused)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 4, 3, padding=1)
        self.c = nn.Conv3d(4, 4, 3, padding=1)
        self.d = nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect")
        self.e = nn.Conv3d(4, 2, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.a(x))  # module, in place
        x = F.relu(self.b(x), inplace=True)  # function
        y = self.c(x)
        x = y.relu() + y  # read twice: the conv's own values are needed
        x = F.leaky_relu(self.d(x), 0.1)
        return torch.relu(self.e(x))  # the output itself


def programs(model, vol, chunks):
    return volarray.Exact(model, chunks=chunks).plan(vol).stages


@pytest.mark.parametrize("chunks", [(5, 7, 6), (13, 11, 9)])
@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_fused_relu_equals_the_whole_volume_forward(chunks, scheduler):
    torch.manual_seed(0)
    model = Forms().eval()
    vol = random_volume((13, 11, 9))
    (stage,) = programs(model, vol, chunks)
    prog = stage.program
    assert len(prog.relu_fused) == 3 == len(prog.passed_on), prog.relu_fused  # a, b, e
    y = volarray.predict(model, vol, chunks=chunks).compute(scheduler=scheduler)
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)


def test_every_fused_conv_runs_its_relu(monkeypatch):
    """The ReLU nodes are not run: their conv did the work (the count shows it)."""
    calls, real = [], CONV.Conv.convolve

    def spy(self, x, w, b, padding, relu=False):
        calls.append(relu)
        return real(self, x, w, b, padding, relu)
    monkeypatch.setattr(CONV.Conv, "convolve", spy)
    model = seeded(FaultSeg3D)
    vol = random_volume((24, 16, 32))
    y = volarray.predict(model, vol, chunks=(24, 16, 32)).compute(scheduler="sync")
    assert_volume_close(y, whole_volume(model, vol), atol=1e-5)
    assert sum(calls) >= 10 and not all(calls), calls  # the classifier conv has no ReLU

