"""Training-form re-parameterizable blocks and their torch-side deploy forms.

Each block is an ``nn.Module`` whose ``forward`` is the multi-branch training form and whose
``reparameterize()`` returns the deploy form: one ``Conv2d`` with bias per stage, followed by the
block's activation. The fusion is computed analytically here so that the ONNX pass
(``onnxrepq.passes.fuse_branches``) can be checked against an independent derivation.

Blocks: ``RepVGGBlock``, ``QARepVGGBlock``, ``ACBlock``, ``DBBBlock``, ``MobileOneBlock``.
``randomize_bn`` gives BN layers non-trivial statistics so that tests exercise the folding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Kernel = tuple[torch.Tensor, torch.Tensor]  # (weight [O, I/g, kh, kw], bias [O])


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = x * scale + shift, per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def apply_bn(kernel: Kernel, bn: nn.BatchNorm2d | None) -> Kernel:
    """Fold a BN that follows a convolution (weight, bias) into it."""
    if bn is None:
        return kernel
    weight, bias = kernel
    scale, shift = bn_scale_shift(bn)
    return weight * scale.reshape(-1, 1, 1, 1), bias * scale + shift


def pad_kernel(weight: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Zero-pad a smaller kernel to kh x kw keeping it centred (odd kernel sizes)."""
    dh, dw = (kh - weight.shape[2]) // 2, (kw - weight.shape[3]) // 2
    return F.pad(weight, (dw, kw - weight.shape[3] - dw, dh, kh - weight.shape[2] - dh))


def identity_kernel(channels: int, groups: int, k: int = 1) -> Kernel:
    """The grouped k x k convolution that returns its input."""
    per_group = channels // groups
    weight = torch.zeros(channels, per_group, k, k)
    for channel in range(channels):
        weight[channel, channel % per_group, k // 2, k // 2] = 1.0
    return weight, torch.zeros(channels)


def compose_pointwise(first: Kernel, second: Kernel, groups: int) -> Kernel:
    """Kernel of ``second(first(x))`` where ``first`` is a grouped 1x1 convolution with bias.

    Exact at the borders only when ``first``'s output is padded with its own bias value (as DBB
    does), which the blocks below arrange by padding *before* the 1x1 convolution.
    """
    w1, b1 = first
    w2, b2 = second
    out_per_group, mid_per_group = w2.shape[0] // groups, w2.shape[1]
    weights = []
    for g in range(groups):
        w2g = w2[g * out_per_group:(g + 1) * out_per_group]
        w1g = w1[g * mid_per_group:(g + 1) * mid_per_group, :, 0, 0]
        weights.append(torch.einsum("omhw,mi->oihw", w2g, w1g))
    b1_grouped = b1.reshape(groups, 1, mid_per_group)
    w2_grouped = w2.sum(dim=(2, 3)).reshape(groups, out_per_group, mid_per_group)
    bias = (w2_grouped * b1_grouped).sum(-1).reshape(-1) + b2
    return torch.cat(weights), bias


class ConvBN(nn.Module):
    """Conv2d without bias, optionally followed by BN; ``kernel()`` gives the fused (w, b)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, groups=1, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x

    def kernel(self) -> Kernel:
        weight = self.conv.weight.detach()
        return apply_bn((weight, torch.zeros(weight.shape[0])), self.bn)


def sum_kernels(kernels: list[Kernel], k: int | tuple[int, int]) -> Kernel:
    """Add branch kernels after centring each in a k x k window."""
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = sum(pad_kernel(w, kh, kw) for w, _ in kernels)
    return weight, sum(b for _, b in kernels)


def make_conv(kernel: Kernel, cin: int, stride: int, groups: int) -> nn.Conv2d:
    weight, bias = kernel
    kh, kw = weight.shape[2:]
    conv = nn.Conv2d(cin, weight.shape[0], (kh, kw), stride, (kh // 2, kw // 2), groups=groups)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class RepVGGBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN (+ identity BN when shapes allow), summed, ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.cin, self.stride, self.groups = cin, stride, groups
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def reparameterize(self) -> nn.Module:
        kernels = [self.dense.kernel(), self.pointwise.kernel()]
        if self.identity is not None:
            kernels.append(apply_bn(identity_kernel(self.cin, self.groups), self.identity))
        conv = make_conv(sum_kernels(kernels, 3), self.cin, self.stride, self.groups)
        return nn.Sequential(conv, nn.ReLU())


class QARepVGGBlock(nn.Module):
    """QARepVGG: 3x3 conv+BN + 1x1 conv (no BN) + identity (no BN), summed, then BN, ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.cin, self.stride, self.groups = cin, stride, groups
        self.dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, 0, groups, bn=False)
        self.has_identity = cin == cout and stride == 1
        self.post_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.pointwise(x)
        if self.has_identity:
            out = out + x
        return self.act(self.post_bn(out))

    def reparameterize(self) -> nn.Module:
        kernels = [self.dense.kernel(), self.pointwise.kernel()]
        if self.has_identity:
            kernels.append(identity_kernel(self.cin, self.groups))
        kernel = apply_bn(sum_kernels(kernels, 3), self.post_bn)
        return nn.Sequential(make_conv(kernel, self.cin, self.stride, self.groups), nn.ReLU())


class ACBlock(nn.Module):
    """ACNet: 3x3 conv+BN + 1x3 conv+BN + 3x1 conv+BN, summed, ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.cin, self.stride, self.groups = cin, stride, groups
        self.square = ConvBN(cin, cout, 3, stride, 1, groups)
        self.horizontal = ConvBN(cin, cout, (1, 3), stride, (0, 1), groups)
        self.vertical = ConvBN(cin, cout, (3, 1), stride, (1, 0), groups)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.square(x) + self.horizontal(x) + self.vertical(x))

    def reparameterize(self) -> nn.Module:
        branches = (self.square, self.horizontal, self.vertical)
        kernel = sum_kernels([b.kernel() for b in branches], 3)
        return nn.Sequential(make_conv(kernel, self.cin, self.stride, self.groups), nn.ReLU())


class PaddedPointwise(nn.Module):
    """Zero pad, then 1x1 conv+BN: the BN bias lands in the padded border, as in DBB's BNAndPad.

    Padding before the 1x1 convolution (rather than zero-padding after the BN) keeps the branch
    exactly fusable: the fused kxk convolution sees the BN bias at the border, as this one does.
    """

    def __init__(self, cin, cmid, pad, groups):
        super().__init__()
        self.pad = pad
        self.conv = ConvBN(cin, cmid, 1, 1, 0, groups)

    def forward(self, x):
        return self.conv(F.pad(x, (self.pad,) * 4))


class DBBBlock(nn.Module):
    """Diverse Branch Block: kxk+BN, 1x1+BN, 1x1+BN->kxk+BN, 1x1+BN->AvgPool(k)+BN; ReLU."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__()
        self.cin, self.k, self.stride, self.groups = cin, kernel, stride, groups
        pad = kernel // 2
        self.dense = ConvBN(cin, cout, kernel, stride, pad, groups)
        self.pointwise = ConvBN(cin, cout, 1, stride, 0, groups)
        self.seq_first = PaddedPointwise(cin, cin, pad, groups)
        self.seq_second = ConvBN(cin, cout, kernel, stride, 0, groups)
        self.avg_first = PaddedPointwise(cin, cout, pad, groups)
        self.avg_pool = nn.AvgPool2d(kernel, stride, 0)
        self.avg_bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        sequential = self.seq_second(self.seq_first(x))
        averaged = self.avg_bn(self.avg_pool(self.avg_first(x)))
        return self.act(self.dense(x) + self.pointwise(x) + sequential + averaged)

    def reparameterize(self) -> nn.Module:
        cout = self.dense.conv.out_channels
        sequential = compose_pointwise(self.seq_first.conv.kernel(), self.seq_second.kernel(),
                                       self.groups)
        pool_weight, pool_bias = identity_kernel(cout, self.groups, self.k)
        pool_weight = (pool_weight.sum(dim=(2, 3), keepdim=True) / self.k ** 2).expand_as(pool_weight)
        pool = apply_bn((pool_weight, pool_bias), self.avg_bn)
        averaged = compose_pointwise(self.avg_first.conv.kernel(), pool, self.groups)
        kernels = [self.dense.kernel(), self.pointwise.kernel(), sequential, averaged]
        conv = make_conv(sum_kernels(kernels, self.k), self.cin, self.stride, self.groups)
        return nn.Sequential(conv, nn.ReLU())


class MobileOneBlock(nn.Module):
    """MobileOne: depthwise stage (k x dw3x3+BN, dw1x1+BN, identity BN; ReLU), then pointwise
    stage (k x 1x1+BN, identity BN when cin == cout; ReLU)."""

    def __init__(self, cin, cout, stride=1, k=3):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.dw_branches = nn.ModuleList(ConvBN(cin, cin, 3, stride, 1, cin) for _ in range(k))
        self.dw_scale = ConvBN(cin, cin, 1, stride, 0, cin)
        self.dw_identity = nn.BatchNorm2d(cin) if stride == 1 else None
        self.pw_branches = nn.ModuleList(ConvBN(cin, cout, 1) for _ in range(k))
        self.pw_identity = nn.BatchNorm2d(cout) if cin == cout else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dw_scale(x)
        for branch in self.dw_branches:
            out = out + branch(x)
        if self.dw_identity is not None:
            out = out + self.dw_identity(x)
        x = self.act(out)
        out = self.pw_branches[0](x)
        for branch in self.pw_branches[1:]:
            out = out + branch(x)
        if self.pw_identity is not None:
            out = out + self.pw_identity(x)
        return self.act(out)

    def reparameterize(self) -> nn.Module:
        dw = [b.kernel() for b in self.dw_branches] + [self.dw_scale.kernel()]
        if self.dw_identity is not None:
            dw.append(apply_bn(identity_kernel(self.cin, self.cin), self.dw_identity))
        pw = [b.kernel() for b in self.pw_branches]
        if self.pw_identity is not None:
            pw.append(apply_bn(identity_kernel(self.cout, 1), self.pw_identity))
        depthwise = make_conv(sum_kernels(dw, 3), self.cin, self.stride, self.cin)
        pointwise = make_conv(sum_kernels(pw, 1), self.cin, 1, 1)
        return nn.Sequential(depthwise, nn.ReLU(), pointwise, nn.ReLU())


def randomize_bn(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm2d random non-trivial statistics and affine parameters (in place)."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=generator) * 0.5)
    return module
