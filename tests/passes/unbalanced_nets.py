"""Torch-built nets whose channels are as unbalanced as merged re-parameterized blocks leave them.

Each unbalanced layer multiplies a quarter of its output channels by 100 and another quarter by
0.01 and the next layer divides the matching input channels back, so the float function is that
of an ordinary net while the tensor between the two spans four decades.
"""
import io

import numpy as np
import onnx
import torch
from torch import nn


def channel_gains(channels, seed):
    """x100 on a quarter of the channels, x0.01 on another quarter: what merged BN leaves behind."""
    g = np.ones(channels, np.float32)
    order = np.random.default_rng(seed).permutation(channels)
    g[order[: channels // 4]] = 100.0
    g[order[channels // 4: channels // 2]] = 0.01
    return torch.tensor(g)


class DwPw(nn.Module):
    """A stem conv, then depthwise 3x3 -> Relu -> pointwise 1x1 -> Relu blocks (MobileNet style)."""

    def __init__(self, widths=(16, 16, 32, 32)):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, padding=1), nn.ReLU()]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.ReLU(), nn.Conv2d(cin, cout, 1), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])

    def forward(self, x):
        return self.body(x)


def unbalance_dwpw(net, seed=0):
    convs = [m for m in net.body if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for i, conv in enumerate(convs[:-1]):
            if conv.groups > 1:  # depthwise: its output channels feed the pointwise conv after it
                gain = channel_gains(conv.out_channels, seed + i)
                conv.weight *= gain.view(-1, 1, 1, 1)
                conv.bias *= gain
                convs[i + 1].weight /= gain.view(1, -1, 1, 1)
    return net


class RepBlock(nn.Module):
    """RepVGG's training form: 3x3+BN, 1x1+BN and (same shape) an identity BN, summed, then Relu."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-9))
        self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout, eps=1e-9))
        self.identity = nn.BatchNorm2d(cout, eps=1e-9) if cin == cout and stride == 1 else None
    def forward(self, x):
        y = self.k3(x) + self.k1(x)
        return torch.relu(y + self.identity(x) if self.identity is not None else y)


class RepNet(nn.Module):
    def __init__(self, widths=((3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 32, 1))):
        super().__init__()
        self.blocks = nn.Sequential(*[RepBlock(*w) for w in widths])

    def forward(self, x):
        return self.blocks(x)


def randomize_bn(net, seed):
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=gen)
            m.bias.data = 0.2 * torch.randn(c, generator=gen)
            m.running_mean = 0.1 * torch.randn(c, generator=gen)
            m.running_var = 0.5 + torch.rand(c, generator=gen)


def unbalance_rep(net, seed=0):
    blocks = list(net.blocks)
    with torch.no_grad():
        for i, block in enumerate(blocks[:-1]):
            gain = channel_gains(block.k3[0].out_channels, seed + i)
            for bn in [block.k3[1], block.k1[1]] + ([block.identity] if block.identity is not None else []):
                bn.weight *= gain
                bn.bias *= gain
            nxt = blocks[i + 1]
            nxt.k3[0].weight /= gain.view(1, -1, 1, 1)
            nxt.k1[0].weight /= gain.view(1, -1, 1, 1)
            if nxt.identity is not None:  # the identity branch reads the scaled input: its BN undoes it
                nxt.identity.running_mean *= gain
                nxt.identity.running_var *= gain ** 2
    return net


def export(net, size=16):
    net.eval()  # BN uses the running statistics set above
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 3, size, size), buffer, input_names=["x"], output_names=["y"],
                      opset_version=13, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def build(kind: str, seed: int = 0) -> onnx.ModelProto:
    """``"dwpw"`` or ``"rep"`` (branches left for the fusion pass), unbalanced, exported to ONNX."""
    torch.manual_seed(seed)
    if kind == "dwpw":
        return export(unbalance_dwpw(DwPw(), seed))
    net = RepNet()
    randomize_bn(net, seed)
    return export(unbalance_rep(net, seed))
