"""QuantizeLinear and DequantizeLinear as fake quantization (float values, onnxruntime's numbers).

QuantizeLinear's output stays float32 holding the integers; the integer type is read from the
zero point's declared type (uint8 when the zero point is omitted), so a learner may override the
zero point with a float parameter without changing the saturation bounds.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..fake_quant import INT_RANGES, IntRange, dequantize, quantize
from .registry import UnsupportedOpError, register


def integer_range(node: gs.Node) -> IntRange:
    """Saturation bounds of a QuantizeLinear, from its zero point's type."""
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is None or zero_point.dtype is None or (isinstance(zero_point, gs.Variable) and not zero_point.name):
        return INT_RANGES["uint8"]
    dtype = zero_point.dtype
    if isinstance(dtype, int):    # gs keeps an onnx enum for types numpy lacks (int4, uint4)
        name = onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower()
    else:
        name = np.dtype(dtype).name
    if name not in INT_RANGES:
        raise UnsupportedOpError(f"QuantizeLinear {node.name!r} to {name} is not supported")
    return INT_RANGES[name]


def _axis(inputs, attrs):
    scale = inputs[1]
    return None if scale.numel() == 1 and scale.dim() <= 1 else attrs.get("axis", 1)


def _optional(inputs, index):
    return inputs[index] if len(inputs) > index else None


@register("QuantizeLinear")
def quantize_linear(inputs, attrs, node, ste: bool = False):
    x, scale = inputs[0], inputs[1]
    return quantize(x, scale, _optional(inputs, 2), integer_range(node), _axis(inputs, attrs), ste)


@register("DequantizeLinear")
def dequantize_linear(inputs, attrs, node):
    return dequantize(inputs[0], inputs[1], _optional(inputs, 2), _axis(inputs, attrs))
