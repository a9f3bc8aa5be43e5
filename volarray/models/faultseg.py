"""FaultSeg3D (Wu et al., 2019): the simplified U-Net used for seismic fault detection."""
from __future__ import annotations

import torch
import torch.nn as nn


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv3d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True))


class FaultSeg3D(nn.Module):
    """1 -> 16, 32, 64 with max-pools, a 128 bottleneck, nearest upsampling and
    concatenation, a 1x1x1 conv and a sigmoid. Spatial sizes must divide by 8."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.enc1, self.enc2 = _double_conv(in_channels, w), _double_conv(w, 2 * w)
        self.enc3, self.bottom = _double_conv(2 * w, 4 * w), _double_conv(4 * w, 8 * w)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec3 = _double_conv(12 * w, 4 * w)
        self.dec2 = _double_conv(6 * w, 2 * w)
        self.dec1 = _double_conv(3 * w, w)
        self.head = nn.Conv3d(w, out_channels, 1)

    def forward(self, x):
        c1 = self.enc1(x)
        c2 = self.enc2(self.pool(c1))
        c3 = self.enc3(self.pool(c2))
        c4 = self.bottom(self.pool(c3))
        u3 = self.dec3(torch.cat([self.up(c4), c3], dim=1))
        u2 = self.dec2(torch.cat([self.up(u3), c2], dim=1))
        u1 = self.dec1(torch.cat([self.up(u2), c1], dim=1))
        return torch.sigmoid(self.head(u1))
