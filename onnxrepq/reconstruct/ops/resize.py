"""Resize (opset 11-18): nearest and (bi/tri)linear, separable over the resized axes.

Coordinates are computed per output index exactly as the spec writes them and the input is
gathered with index_select, so nearest is exact and linear differs from onnxruntime only by float
summation order. onnxruntime clamps linear source coordinates into [0, size - 1]
(onnxruntime/core/providers/cpu/tensor/upsamplebase.h).
"""
from __future__ import annotations

import numpy as np
import torch

from .registry import UnsupportedOpError, register


def _source_coordinates(out_size: int, in_size: int, scale: float, mode: str) -> torch.Tensor:
    """Input coordinate of every output index, in float32 and in onnxruntime's order of operations."""
    x = torch.arange(out_size, dtype=torch.float32)
    scale = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(x)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    raise UnsupportedOpError(f"Resize coordinate_transformation_mode {mode!r}")


def _nearest_index(coords: torch.Tensor, rule: str, in_size: int) -> torch.Tensor:
    if rule == "floor":
        index = torch.floor(coords)
    elif rule == "ceil":
        index = torch.ceil(coords)
    else:
        fraction = coords - torch.floor(coords)
        tie = fraction == 0.5
        rounded = torch.floor(coords + 0.5)
        index = torch.where(tie, torch.floor(coords) if rule == "round_prefer_floor" else torch.ceil(coords), rounded)
    return index.clamp(0, in_size - 1).long()


def _resize_axis(x: torch.Tensor, axis: int, out_size: int, scale: float, attrs) -> torch.Tensor:
    in_size = x.shape[axis]
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    coords = _source_coordinates(out_size, in_size, scale, transform).to(x.device)
    mode = attrs.get("mode", "nearest")
    if mode == "nearest":
        index = _nearest_index(coords, attrs.get("nearest_mode", "round_prefer_floor"), in_size)
        return x.index_select(axis, index)
    if mode != "linear":
        raise UnsupportedOpError(f"Resize mode {mode!r}")
    coords = coords.clamp(0, in_size - 1)
    low = torch.floor(coords).long()
    high = torch.clamp(low + 1, max=in_size - 1)
    weight_shape = [1] * x.dim()
    weight_shape[axis] = out_size
    weight = (coords - low.to(coords.dtype)).reshape(weight_shape).to(x.dtype)
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


@register("Resize")
def resize(inputs, attrs, node):
    x = inputs[0]
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel() else None
    if sizes is not None:
        out_sizes = [int(s) for s in sizes.tolist()]
        factors = [float(np.float32(out) / np.float32(size)) for out, size in zip(out_sizes, x.shape)]
    else:
        factors = [float(s) for s in scales.tolist()]
        out_sizes = [int(np.float32(size) * np.float32(f)) for size, f in zip(x.shape, factors)]
    for axis, (out_size, factor) in enumerate(zip(out_sizes, factors)):
        if out_size != x.shape[axis] or factor != 1.0:
            x = _resize_axis(x, axis, out_size, factor, attrs)
    return x
