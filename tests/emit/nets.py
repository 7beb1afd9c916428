"""A small torch conv net with the blocks of mobile OCR/detection models, shared by the target tests."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SqueezeExcite(nn.Module):
    """GAP -> conv -> ReLU -> conv -> HardSigmoid -> Mul, as in MobileNetV3 and PP-LCNet."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 2, 1), nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class MobileBlocksNet(nn.Module):
    """Residual adds, ReLU, depthwise + HardSwish, an SE block, MaxPool, Concat and an upsampling:
    Resize (``deconv=False``) or a ConvTranspose (``deconv=True``)."""

    def __init__(self, deconv: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.depthwise, self.pointwise = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)
        self.se = SqueezeExcite(16)
        self.left, self.right = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.upsample = nn.ConvTranspose2d(16, 16, 2, stride=2) if deconv else None
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = F.hardswish(self.depthwise(x))
        x = self.pointwise(x)
        x = x + self.se(x)
        x = F.max_pool2d(x, 2)
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)
        x = self.upsample(x) if self.upsample is not None else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.out(x)
