"""Assembles the zoo's small classification networks from the re-parameterizable blocks.

Every family shares one layout (stride-2 stem, four stages, global average pool, linear head) so
that differences in quantization error between families come from the blocks, not the layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tools.zoo import blocks

BlockFactory = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block

BLOCK_FACTORIES: dict[str, BlockFactory] = {
    "repvgg": lambda cin, cout, stride: blocks.RepVGGBlock(cin, cout, stride),
    "qarepvgg": lambda cin, cout, stride: blocks.QARepVGGBlock(cin, cout, stride),
    "acnet": lambda cin, cout, stride: blocks.ACBlock(cin, cout, stride),
    "dbb": lambda cin, cout, stride: blocks.DBBBlock(cin, cout, kernel=3, stride=stride),
    "mobileone": lambda cin, cout, stride: blocks.MobileOneBlock(cin, cout, stride, k=3),
}


@dataclass(frozen=True)
class NetworkSpec:
    family: str
    stem_width: int = 16
    stage_widths: tuple[int, ...] = (16, 32, 64, 128)
    stage_depths: tuple[int, ...] = (1, 2, 3, 2)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    num_classes: int = 62
    in_channels: int = 3
    stem_family: str | None = None  # None: the stem is a block of `family`

    @property
    def block_count(self) -> int:
        return 1 + sum(self.stage_depths)


FAMILY_SPECS: dict[str, NetworkSpec] = {
    "repvgg": NetworkSpec("repvgg"),
    "qarepvgg": NetworkSpec("qarepvgg"),
    "acnet": NetworkSpec("acnet"),
    "dbb": NetworkSpec("dbb"),
    # MobileOne's own stem is a dense re-parameterizable 3x3 (k 3x3 branches + 1x1), i.e. a
    # RepVGG-style block; its depthwise block on 3 input channels learned far worse (53% top-1).
    "mobileone": NetworkSpec("mobileone", stem_family="repvgg"),
}


class ZooNet(nn.Module):
    def __init__(self, features: nn.Sequential, head_width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(head_width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(images)), 1))

    def reparameterize(self) -> ZooNet:
        """A deploy-form copy: every block replaced by its torch-side fusion; self is untouched."""
        deployed = copy.deepcopy(self)
        deployed.features = nn.Sequential(*(block.reparameterize() for block in self.features))
        return deployed.eval()


def stage_blocks(spec: NetworkSpec, make_block: BlockFactory) -> list[nn.Module]:
    """The first block of a stage changes width and stride; the rest keep both, so they carry
    the identity branches whose BatchNorms produce the fused-weight outliers."""
    layers, channels = [], spec.stem_width
    for width, depth, stride in zip(spec.stage_widths, spec.stage_depths, spec.stage_strides):
        for position in range(depth):
            layers.append(make_block(channels, width, stride if position == 0 else 1))
            channels = width
    return layers


def build_network(spec: NetworkSpec, seed: int = 0) -> ZooNet:
    torch.manual_seed(seed)
    make_block = BLOCK_FACTORIES[spec.family]
    stem = BLOCK_FACTORIES[spec.stem_family or spec.family](spec.in_channels, spec.stem_width, 2)
    features = nn.Sequential(stem, *stage_blocks(spec, make_block))
    return ZooNet(features, spec.stage_widths[-1], spec.num_classes)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
