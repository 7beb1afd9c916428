"""Fake quantization in torch that matches onnxruntime's QuantizeLinear/DequantizeLinear bit for bit.

Values stay float32 so that a learner can take gradients, but the numbers after dequantization
are the ones onnxruntime produces: MLAS divides by the scale (it does not multiply by a
reciprocal), rounds half to even (``cvtps2dq`` under the default rounding mode), adds the zero
point and saturates to the type's range (onnxruntime/core/mlas/lib/quantize.cpp). DequantizeLinear
is ``(q - zero_point) * scale`` in float32, exact in the subtraction.

The straight-through variant (``ste=True``) keeps the same forward numbers; its backward passes
the gradient through the rounding, so chaining quantize -> dequantize gives x the gradient inside
the clip range only and gives the scale LSQ's gradient (round(x/s) - x/s inside, the clip bound
minus the zero point outside; Esser et al., arXiv 1902.08153).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntRange:
    """The saturation bounds of an integer type."""
    low: int
    high: int


INT_RANGES: dict[str, IntRange] = {
    "uint8": IntRange(0, 255),
    "int8": IntRange(-128, 127),
    "uint4": IntRange(0, 15),
    "int4": IntRange(-8, 7),
    "uint16": IntRange(0, 65535),
    "int16": IntRange(-32768, 32767),
}


class _RoundStraightThrough(torch.autograd.Function):
    """torch.round (half to even) forward; identity backward."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        return torch.round(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _along_axis(param: torch.Tensor, rank: int, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel parameter so it broadcasts along ``axis``; scalars stay as they are."""
    if param.numel() == 1 or axis is None:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = param.numel()
    return param.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bounds: IntRange,
             axis: int | None = None, ste: bool = False) -> torch.Tensor:
    """QuantizeLinear as float: saturate(round_half_even(x / scale) + zero_point)."""
    scale = _along_axis(scale.to(x.dtype), x.dim(), axis)
    steps = x / scale
    rounded = _RoundStraightThrough.apply(steps) if ste else torch.round(steps)
    if zero_point is not None:
        rounded = rounded + _along_axis(zero_point.to(x.dtype), x.dim(), axis)
    return torch.clamp(rounded, bounds.low, bounds.high)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               axis: int | None = None) -> torch.Tensor:
    """DequantizeLinear: (q - zero_point) * scale, computed in the scale's float type."""
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    q = q.to(dtype)
    if zero_point is not None:
        q = q - _along_axis(zero_point.to(dtype), q.dim(), axis)
    return q * _along_axis(scale, q.dim(), axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bounds: IntRange,
                  axis: int | None = None, ste: bool = False) -> torch.Tensor:
    """Quantize then dequantize; with ``ste`` the gradients are LSQ's."""
    return dequantize(quantize(x, scale, zero_point, bounds, axis, ste), scale, zero_point, axis)
