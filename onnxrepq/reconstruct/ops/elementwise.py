"""Pointwise math, comparisons and activations."""
from __future__ import annotations

import torch

from .registry import register

_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt,
    "And": torch.logical_and, "Or": torch.logical_or,
}
_UNARY = {
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Neg": torch.neg, "Abs": torch.abs, "Relu": torch.relu,
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Not": torch.logical_not,
    "Identity": lambda x: x,
}


@register(*_BINARY)
def binary(inputs, attrs, node):
    left, right = inputs
    result = _BINARY[node.op](left, right)
    # Pow keeps the base's type in ONNX; torch would promote an int base with a float exponent.
    return result.to(left.dtype) if node.op == "Pow" else result


@register("Div")
def div(inputs, attrs, node):
    left, right = inputs
    if left.is_floating_point():
        return left / right
    return torch.div(left, right, rounding_mode="trunc")  # C integer division, as onnxruntime


@register(*_UNARY)
def unary(inputs, attrs, node):
    return _UNARY[node.op](inputs[0])


@register("LeakyRelu")
def leaky_relu(inputs, attrs, node):
    return torch.nn.functional.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


@register("PRelu")
def prelu(inputs, attrs, node):
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


@register("Clip")
def clip(inputs, attrs, node):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    low = attrs.get("min") if low is None else low   # opset < 11 keeps the bounds as attributes
    high = attrs.get("max") if high is None else high
    if low is not None:
        x = torch.maximum(x, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        x = torch.minimum(x, torch.as_tensor(high, dtype=x.dtype))
    return x


@register("HardSigmoid")
def hard_sigmoid(inputs, attrs, node):
    x = inputs[0]
    return torch.clamp(attrs.get("alpha", 0.2) * x + attrs.get("beta", 0.5), 0.0, 1.0)


@register("HardSwish")
def hard_swish(inputs, attrs, node):
    x = inputs[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@register("Softmax")
def softmax(inputs, attrs, node):
    return torch.softmax(inputs[0], dim=attrs.get("axis", -1))


@register("Where")
def where(inputs, attrs, node):
    condition, if_true, if_false = inputs
    return torch.where(condition.bool(), if_true, if_false)
