"""MaxPool, AveragePool and their global forms.

torch pools accept only symmetric padding of at most half the kernel; other pads are applied
explicitly (-inf for max, zeros plus a count of real elements for averages that exclude pads).
1-D pools run as 2-D with a unit axis so that every rank takes the same path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nn import Window, pad_spatial, window
from .registry import register

_MAX = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _lift_1d(function):
    """Run a 1-D pool as 2-D over a unit leading spatial axis."""
    def wrapped(inputs, attrs, node):
        x = inputs[0]
        if x.dim() != 3:
            return function(inputs, attrs, node)
        attrs = dict(attrs)
        for key, unit in (("kernel_shape", 1), ("strides", 1), ("dilations", 1)):
            if key in attrs:
                attrs[key] = [unit] + list(attrs[key])
        if "pads" in attrs:
            pads = list(attrs["pads"])
            attrs["pads"] = [0, pads[0], 0, pads[1]]
        return function([x.unsqueeze(2)] + list(inputs[1:]), attrs, node).squeeze(2)
    return wrapped


def _crop_to_onnx_size(y: torch.Tensor, x: torch.Tensor, geometry: Window) -> torch.Tensor:
    """Drop a ceil-mode window that would start in the end padding, as onnxruntime does.

    After explicit padding torch cannot tell the end padding from the input and keeps such a
    window (onnxruntime/core/providers/cpu/nn/pool_attributes.h, ComputeOutputSize).
    """
    if not geometry.ceil_mode:
        return y
    spatial = len(geometry.kernel)
    index = [slice(None), slice(None)]
    for axis in range(spatial):
        size, begin, stride = x.shape[2 + axis], geometry.pads[axis], geometry.strides[axis]
        extent = (geometry.kernel[axis] - 1) * geometry.dilations[axis] + 1
        out = -(-(size + begin + geometry.pads[spatial + axis] - extent) // stride) + 1
        if (out - 1) * stride >= size + begin:
            out -= 1
        index.append(slice(0, out))
    return y[tuple(index)]


def _torch_padding(geometry: Window) -> list[int] | None:
    """The padding torch's pools can take themselves: symmetric and at most half the kernel."""
    spatial = len(geometry.kernel)
    begins, ends = geometry.pads[:spatial], geometry.pads[spatial:]
    return begins if begins == ends and all(2 * p <= k for p, k in zip(begins, geometry.kernel)) else None


@register("MaxPool")
@_lift_1d
def max_pool(inputs, attrs, node):
    x = inputs[0]
    g = window(x, attrs, None, dilate_same_pads=False)
    padding = _torch_padding(g)
    if padding is not None:
        return _MAX[len(g.kernel)](x, g.kernel, g.strides, padding, g.dilations, ceil_mode=g.ceil_mode)
    padded = pad_spatial(x, g.pads, float("-inf"))
    return _crop_to_onnx_size(_MAX[len(g.kernel)](padded, g.kernel, g.strides, 0, g.dilations, ceil_mode=g.ceil_mode),
                              x, g)


@register("AveragePool")
@_lift_1d
def average_pool(inputs, attrs, node):
    x = inputs[0]
    g = window(x, attrs, None, dilate_same_pads=False)
    average = _AVG[len(g.kernel)]
    include_pad = bool(attrs.get("count_include_pad", 0))
    padding = _torch_padding(g)
    if padding is not None:
        return average(x, g.kernel, g.strides, padding, g.ceil_mode, include_pad)
    padded = pad_spatial(x, g.pads)
    if include_pad:
        y = average(padded, g.kernel, g.strides, 0, g.ceil_mode, True)
    else:
        sums = average(padded, g.kernel, g.strides, 0, g.ceil_mode, True, divisor_override=1)
        ones = pad_spatial(torch.ones_like(x[:1, :1]), g.pads)
        y = sums / average(ones, g.kernel, g.strides, 0, g.ceil_mode, True, divisor_override=1)
    return _crop_to_onnx_size(y, x, g)


@register("GlobalAveragePool")
def global_average_pool(inputs, attrs, node):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(inputs, attrs, node):
    x = inputs[0]
    return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)
