"""Reference architectures with seeded weights, for tests, examples and benchmarks."""
from __future__ import annotations

import torch

from .faultseg import FaultSeg3D
from .multiscale import MultiScaleNet
from .norms import DeepLabV3Plus3D, GroupNormNet, InstanceNormUNet, SEResUNet

__all__ = ["FaultSeg3D", "MultiScaleNet", "InstanceNormUNet", "GroupNormNet",
           "DeepLabV3Plus3D", "SEResUNet", "seeded"]


def seeded(cls, seed: int = 0, **kwargs) -> torch.nn.Module:
    """An instance of ``cls`` with reproducible random weights, in eval mode.

    BatchNorm running statistics are randomized too, so that they matter.
    """
    torch.manual_seed(seed)
    model = cls(**kwargs)
    for m in model.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.InstanceNorm3d)) and m.affine:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
