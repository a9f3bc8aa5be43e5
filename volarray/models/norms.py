"""Reference networks with whole-volume reductions: InstanceNorm, GroupNorm,
squeeze-excitation and ASPP image pooling. Exact mode computes their statistics
over the whole volume, chunk by chunk, as one whole-volume forward does."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_in(c_in, c_out):
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out, affine=True),
                         nn.ReLU(inplace=True))


class InstanceNormUNet(nn.Module):
    """A FaultSSL-style U-Net: conv -> InstanceNorm -> ReLU blocks, max-pool down,
    trilinear up, skip concatenation, sigmoid head. Sizes divisible by 4."""

    def __init__(self, in_channels=1, out_channels=1, width=16):
        super().__init__()
        w = width
        self.e1 = nn.Sequential(_conv_in(in_channels, w), _conv_in(w, w))
        self.e2 = nn.Sequential(_conv_in(w, 2 * w), _conv_in(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv_in(2 * w, 4 * w), _conv_in(4 * w, 4 * w))
        self.d2 = nn.Sequential(_conv_in(6 * w, 2 * w), _conv_in(2 * w, 2 * w))
        self.d1 = nn.Sequential(_conv_in(3 * w, w), _conv_in(w, w))
        self.head = nn.Conv3d(w, out_channels, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool3d(s1, 2))
        m = self.mid(F.max_pool3d(s2, 2))
        u2 = self.d2(torch.cat([F.interpolate(m, scale_factor=2, mode="trilinear"), s2], 1))
        u1 = self.d1(torch.cat([F.interpolate(u2, scale_factor=2, mode="trilinear"), s1], 1))
        return torch.sigmoid(self.head(u1))


class GroupNormNet(nn.Module):
    """A GEM-style multi-resolution network: GroupNorm (groups != channels) + SiLU,
    a full- and a half-resolution branch exchanging features, summed fusion."""

    def __init__(self, in_channels=1, classes=2, width=24, groups=4):
        super().__init__()
        w = width

        def block(c_in, c_out, **kw):
            return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=kw.pop("padding", 1), **kw),
                                 nn.GroupNorm(groups, c_out), nn.SiLU())
        self.stem = block(in_channels, w)
        self.high = block(w, w)
        self.down = block(w, 2 * w, stride=2)
        self.low = block(2 * w, 2 * w, dilation=2, padding=2)
        self.low_to_high = nn.Conv3d(2 * w, w, 1)
        self.fuse = nn.Sequential(nn.Conv3d(w, w, 3, padding=1), nn.GroupNorm(1, w), nn.SiLU())
        self.head = nn.Conv3d(w, classes, 1)

    def forward(self, x):
        s = self.stem(x)
        h = self.high(s)
        lo = self.low(self.down(s))
        up = F.interpolate(self.low_to_high(lo), size=h.shape[2:], mode="trilinear",
                           align_corners=False)
        return self.head(self.fuse(h + up))


class ASPP(nn.Module):
    def __init__(self, c_in, c_out, rates=(2, 3)):
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv3d(c_in, c_out, 1), nn.GroupNorm(4, c_out), nn.ReLU())] +
            [nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=r, dilation=r), nn.GroupNorm(4, c_out),
                           nn.ReLU()) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(c_in, c_out, 1), nn.ReLU())
        self.project = nn.Sequential(nn.Conv3d(c_out * (len(rates) + 2), c_out, 1), nn.ReLU())

    def forward(self, x):
        feats = [b(x) for b in self.branches]
        pooled = F.interpolate(self.pool(x), size=x.shape[2:], mode="trilinear",
                               align_corners=False)
        return self.project(torch.cat(feats + [pooled], 1))


class DeepLabV3Plus3D(nn.Module):
    """A ChannelSeg3D-style DeepLabV3+: strided stem, strided encoder, dilated ASPP
    with an image-pooling branch, low-level skip, trilinear decoder."""

    def __init__(self, in_channels=1, classes=2, width=16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv3d(in_channels, w, 3, stride=2, padding=1), nn.ReLU())
        self.enc = nn.Sequential(nn.Conv3d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv3d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.aspp = ASPP(2 * w, 2 * w)
        self.low = nn.Sequential(nn.Conv3d(w, w // 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv3d(2 * w + w // 2, w, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv3d(w, classes, 1)

    def forward(self, x):
        s = self.stem(x)
        a = self.aspp(self.enc(s))
        a = F.interpolate(a, size=s.shape[2:], mode="trilinear", align_corners=False)
        d = self.cls(self.dec(torch.cat([a, self.low(s)], 1)))
        return F.interpolate(d, size=x.shape[2:], mode="trilinear", align_corners=False)


class SqueezeExcite(nn.Module):
    """x * sigmoid(MLP(mean over the volume)), the MLP with a LayerNorm over channels."""

    def __init__(self, c, reduction=4):
        super().__init__()
        self.fc1 = nn.Linear(c, c // reduction)
        self.norm = nn.LayerNorm(c // reduction)
        self.fc2 = nn.Linear(c // reduction, c)

    def forward(self, x):
        s = x.mean(dim=(2, 3, 4))
        s = torch.sigmoid(self.fc2(F.relu(self.norm(self.fc1(s)))))
        return x * s.view(s.shape[0], s.shape[1], 1, 1, 1)


class SEResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.se = SqueezeExcite(c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return F.relu(y + self.skip(x))


class SEResUNet(nn.Module):
    """A residual U-Net with squeeze-excitation blocks (global pooling per block)."""

    def __init__(self, in_channels=1, classes=3, width=8):
        super().__init__()
        w = width
        self.b1 = SEResBlock(in_channels, w)
        self.b2 = SEResBlock(w, 2 * w)
        self.b3 = SEResBlock(2 * w, 4 * w)
        self.u2 = SEResBlock(6 * w, 2 * w)
        self.u1 = SEResBlock(3 * w, w)
        self.head = nn.Conv3d(w, classes, 1)

    def forward(self, x):
        s1 = self.b1(x)
        s2 = self.b2(F.max_pool3d(s1, 2))
        m = self.b3(F.max_pool3d(s2, 2))
        u2 = self.u2(torch.cat([F.interpolate(m, size=s2.shape[2:]), s2], 1))
        u1 = self.u1(torch.cat([F.interpolate(u2, size=s1.shape[2:]), s1], 1))
        return torch.softmax(self.head(u1), dim=1)
