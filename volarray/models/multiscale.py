"""Reference networks that exercise the rest of exact mode's local op table."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultiScaleNet(nn.Module):
    """Strided and dilated convs, a conv-transpose decoder, trilinear upsampling with
    both align_corners settings, avg pooling, reflect/replicate padding, eval
    BatchNorm, residual adds and a channel softmax. Accepts any spatial shape:
    decoders resize to their skip's shape (``F.interpolate(size=...)``)."""

    def __init__(self, in_channels: int = 1, classes: int = 3, width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Conv3d(in_channels, w, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm3d(w)
        self.down1 = nn.Conv3d(w, 2 * w, 3, stride=2, padding=1)
        self.dil = nn.Conv3d(2 * w, 2 * w, 3, padding=2, dilation=2, padding_mode="replicate")
        self.down2 = nn.Conv3d(2 * w, 4 * w, (3, 3, 2), stride=(2, 2, 2), padding=(1, 1, 0))
        self.ctx = nn.Conv3d(4 * w, 4 * w, 3, padding="same", dilation=3)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, stride=2)
        self.mix1 = nn.Conv3d(4 * w, 2 * w, 3, padding=1)
        self.pool = nn.AvgPool3d(3, stride=1, padding=1, count_include_pad=False)
        self.head = nn.Conv3d(3 * w, classes, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        s0 = self.act(self.bn(self.stem(x)))
        s1 = F.relu(self.down1(s0))
        s1 = s1 + F.gelu(self.dil(s1))
        s2 = self.act(self.down2(s1))
        s2 = s2 * torch.sigmoid(self.ctx(s2))
        u1 = F.interpolate(self.up2(s2), size=s1.shape[2:], mode="trilinear", align_corners=False)
        u1 = F.silu(self.mix1(torch.cat([u1, s1], dim=1)))
        u0 = F.interpolate(u1, size=s0.shape[2:], mode="trilinear", align_corners=True)
        s0 = F.max_pool3d(self.pool(s0), 3, stride=1, padding=1)
        return torch.softmax(self.head(torch.cat([u0, s0], dim=1)), dim=1)
