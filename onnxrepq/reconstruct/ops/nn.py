"""Layers with weights (Conv, ConvTranspose, Gemm, MatMul), normalizations and reductions."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import int_list, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def same_pads(sizes, kernel, strides, dilations, auto_pad: str) -> list[int]:
    """ONNX ``pads`` (all begins, then all ends) for SAME_UPPER/SAME_LOWER: output = ceil(in / stride)."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


@dataclass(frozen=True)
class Window:
    """Where a sliding-window op (conv or pool) reads: per spatial axis, and pads as ONNX lists them."""
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]          # all begins, then all ends
    ceil_mode: bool


def window(x: torch.Tensor, attrs, default_kernel, dilate_same_pads: bool = True) -> Window:
    """The op's geometry with auto_pad resolved against the input size.

    onnxruntime's pools size SAME padding for the undilated kernel (pool_attributes.h,
    ComputeSizePadDilations) while its convs use the dilated one; ``dilate_same_pads`` says which.
    """
    kernel = list(attrs.get("kernel_shape", default_kernel))
    spatial = len(kernel)
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = same_pads(x.shape[2:], kernel, strides, dilations if dilate_same_pads else [1] * spatial, auto_pad)
    else:
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return Window(kernel, strides, dilations, pads, bool(attrs.get("ceil_mode", 0)))


def pad_spatial(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    """Apply ONNX-ordered spatial pads (begins, then ends) to an N, C, ... tensor."""
    spatial = len(pads) // 2
    torch_pads = [p for axis in reversed(range(spatial)) for p in (pads[axis], pads[spatial + axis])]
    return F.pad(x, torch_pads, value=value)


def _split_inputs(inputs):
    """x, weight, optional bias and the number of spatial axes of a conv-like op."""
    bias = inputs[2] if len(inputs) > 2 else None
    return inputs[0], inputs[1], bias, inputs[0].dim() - 2


@register("Conv")
def conv(inputs, attrs, node):
    x, weight, bias, spatial = _split_inputs(inputs)
    geometry = window(x, attrs, weight.shape[2:])
    padding = geometry.pads[:spatial]
    if padding != geometry.pads[spatial:]:   # torch takes symmetric padding only
        x, padding = pad_spatial(x, geometry.pads), 0
    return _CONV[spatial](x, weight, bias, geometry.strides, padding, geometry.dilations, attrs.get("group", 1))


@register("ConvTranspose")
def conv_transpose(inputs, attrs, node):
    x, weight, bias, spatial = _split_inputs(inputs)
    geometry = window(x, attrs, weight.shape[2:])
    output_padding = attrs.get("output_padding", [0] * spatial)
    full = _CONV_TRANSPOSE[spatial](x, weight, None, geometry.strides, 0, 0, attrs.get("group", 1),
                                    geometry.dilations)
    full_sizes = list(full.shape[2:])
    pads = _transpose_pads(attrs, x.shape[2:], full_sizes, geometry.strides, output_padding)
    # The full result, grown by output_padding at the end, then cropped by pads.
    full = pad_spatial(full, [0] * spatial + list(output_padding))
    index = [slice(None), slice(None)] + [
        slice(pads[axis], full.shape[2 + axis] - pads[spatial + axis]) for axis in range(spatial)]
    out = full[tuple(index)]
    if bias is not None:
        out = out + bias.reshape([1, -1] + [1] * spatial)
    return out


def _transpose_pads(attrs, in_sizes, full_sizes, strides, output_padding) -> list[int]:
    spatial = len(in_sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs:
        targets = list(attrs["output_shape"])[-spatial:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        targets = [size * stride for size, stride in zip(in_sizes, strides)]
    else:
        return list(attrs.get("pads", [0] * (2 * spatial)))
    begins, ends = [], []
    for axis in range(spatial):
        total = full_sizes[axis] + output_padding[axis] - targets[axis]
        small, large = total // 2, total - total // 2
        # onnxruntime puts the smaller half at the start for SAME_UPPER only, the larger one for
        # SAME_LOWER and for an explicit output_shape (cpu/nn/conv_transpose_attributes.h).
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


@register("MatMul")
def matmul(inputs, attrs, node):
    return torch.matmul(inputs[0], inputs[1])


@register("Gemm")
def gemm(inputs, attrs, node):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = torch.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


@register("BatchNormalization")
def batch_norm(inputs, attrs, node):
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv_std = scale / torch.sqrt(var + attrs.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv_std.reshape(shape) + bias.reshape(shape)


@register("LayerNormalization")
def layer_norm(inputs, attrs, node):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    inv_std = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    out = centered * inv_std * scale
    out = out + bias if bias is not None else out
    return [out, mean, inv_std][: len(node.outputs)]


def _reduce_axes(inputs, attrs, rank: int) -> list[int] | None:
    """Axes from the input (ReduceSum 13+, all 18+) or the attribute; None means every axis."""
    axes = int_list(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    if not axes:
        return None
    return [a % rank for a in axes]


@register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def reduce(inputs, attrs, node):
    x = inputs[0]
    axes = _reduce_axes(inputs, attrs, x.dim())
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return x
    dims = axes if axes is not None else list(range(x.dim()))
    keep = bool(attrs.get("keepdims", 1))
    if node.op == "ReduceMean":
        return x.mean(dim=dims, keepdim=keep)
    if node.op == "ReduceSum":
        return x.sum(dim=dims, keepdim=keep)
    function = torch.amax if node.op == "ReduceMax" else torch.amin
    return function(x, dim=dims, keepdim=keep)
