"""Fold per-channel affine ops (BatchNormalization, Mul/Add/Sub/Div by constants) into convs.

Every affine op left between a conv and its quantizer is a float island at run time and a
second rounding of the same signal; folding it gives the quantizer the deploy-form weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import bypass_node, can_bypass, channel_vector, constant_value, sole_consumer
from .base import PassResult

_LINEAR = ("Conv", "Gemm", "ConvTranspose")


@dataclass
class ChannelAffine:
    """y = x * scale + shift along the channel axis."""

    scale: np.ndarray
    shift: np.ndarray


def affine_of(node: gs.Node, channels: int, rank: int) -> Optional[ChannelAffine]:
    """The node as a per-channel affine map on its first (activation) input, if it is one."""
    op = node.op
    if op == "BatchNormalization":
        values = [constant_value(t) for t in node.inputs[1:5]]
        if any(v is None for v in values) or len(node.outputs) != 1:
            return None
        gamma, beta, mean, var = (np.asarray(v, np.float64) for v in values)
        eps = float(node.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        return ChannelAffine(scale, beta - mean * scale)
    if op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    consts = [constant_value(t) for t in node.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    const_index = 0 if consts[0] is not None else 1
    if op in ("Sub", "Div") and const_index == 0:
        return None  # c - x and c / x are not affine in x (the latter not even linear)
    vector = channel_vector(consts[const_index], channels, channel_axis=1, rank=rank)
    if vector is None or not np.all(np.isfinite(vector)):
        return None
    if np.asarray(consts[const_index]).ndim > rank:
        return None
    ones, zeros = np.ones(channels), np.zeros(channels)
    if op == "Mul":
        return ChannelAffine(vector, zeros)
    if op == "Div":
        return None if np.any(vector == 0) else ChannelAffine(1.0 / vector, zeros)
    if op == "Add":
        return ChannelAffine(ones, vector)
    return ChannelAffine(ones, -vector)


def activation_input(node: gs.Node) -> gs.Tensor:
    if node.op in ("Mul", "Add") and isinstance(node.inputs[0], gs.Constant):
        return node.inputs[1]
    return node.inputs[0]


class FoldAffineIntoConv:
    """Fold affine ops into the Conv/Gemm/ConvTranspose before them, or the 1x1 conv after them.

    Rules:
    1. conv -> affine, the conv output read by nothing else: scale the output channels of the
       weight and bias. Covers BatchNormalization and PP-LCNet's learnable scalar Mul/Add.
    2. affine -> Conv, the affine output read by that conv alone: scale the input channels and push
       the shift through the kernel into the bias. A shift folds only into unpadded convs (the zero
       border would see the shift otherwise); a pure scale folds into any conv, as 0 * a = 0.
    ConvTranspose folds only for group 1; Gemm only for a constant B.
    """

    name = "fold_affine"

    def __call__(self, graph: gs.Graph) -> PassResult:
        folded_after = folded_before = 0
        changed = True
        while changed:
            changed = False
            for node in list(graph.nodes):
                if node.op in _LINEAR and self._fold_following(graph, node):
                    folded_after += 1
                    changed = True
                elif node.op == "Conv" and self._fold_preceding(graph, node):
                    folded_before += 1
                    changed = True
            graph.cleanup()
        notes = []
        if folded_after:
            notes.append(f"{folded_after} affine ops folded into the preceding conv/gemm")
        if folded_before:
            notes.append(f"{folded_before} affine ops folded into the following unpadded conv")
        return PassResult(graph, bool(folded_after or folded_before), notes)

    def _fold_following(self, graph: gs.Graph, conv: gs.Node) -> bool:
        weights = linear_weights(conv)
        if weights is None or len(conv.outputs) != 1:
            return False
        weight, bias = weights
        out = conv.outputs[0]
        nxt = sole_consumer(out, graph)
        if nxt is None or activation_input(nxt) is not out or not can_bypass(graph, nxt, out):
            return False
        channels, axis = _output_channels(conv, weight)
        if channels is None:
            return False
        rank = weight.ndim if conv.op != "Gemm" else 2
        affine = affine_of(nxt, channels, rank)
        if affine is None:
            return False
        shape = [1] * weight.ndim
        shape[axis] = channels
        new_weight = weight.astype(np.float64) * affine.scale.reshape(shape)
        new_bias = bias.astype(np.float64) * affine.scale + affine.shift
        set_linear_weights(conv, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype))
        bypass_node(graph, nxt, out)
        return True

    def _fold_preceding(self, graph: gs.Graph, conv: gs.Node) -> bool:
        weights = linear_weights(conv)
        if weights is None:
            return False
        prev = conv.inputs[0].inputs[0] if len(conv.inputs[0].inputs) == 1 else None
        if prev is None or sole_consumer(prev.outputs[0], graph) is not conv or len(prev.outputs) != 1:
            return False
        weight, bias = weights
        groups = int(conv.attrs.get("group", 1))
        in_channels = weight.shape[1] * groups
        affine = affine_of(prev, in_channels, weight.ndim)
        source = activation_input(prev)
        if affine is None or not can_bypass(graph, prev, source):
            return False
        if np.any(affine.shift != 0) and not _unpadded(conv):
            return False  # the zero border would see the shift; a pure scale keeps 0 at 0
        out_channels = weight.shape[0]
        per_group_out = out_channels // groups
        per_group_in = weight.shape[1]
        # input channel seen by weight[o, i] is (o // per_group_out) * per_group_in + i
        index = (np.arange(out_channels)[:, None] // per_group_out) * per_group_in + np.arange(per_group_in)[None, :]
        scale = affine.scale[index].reshape(out_channels, per_group_in, *([1] * (weight.ndim - 2)))
        shift = affine.shift[index].reshape(out_channels, per_group_in, *([1] * (weight.ndim - 2)))
        w64 = weight.astype(np.float64)
        new_bias = bias.astype(np.float64) + (w64 * shift).reshape(out_channels, -1).sum(axis=1)
        set_linear_weights(conv, (w64 * scale).astype(weight.dtype), new_bias.astype(weight.dtype))
        bypass_node(graph, prev, source)
        return True


def linear_weights(node: gs.Node):
    """(weight, bias per output channel) of a Conv/Gemm/ConvTranspose with constant weights, bias zeros when
    absent; None where the layer cannot take a per-channel affine."""
    if len(node.inputs) < 2:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype not in (np.float32, np.float64):
        return None
    if node.op == "Gemm":
        if weight.ndim != 2 or float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        channels = weight.shape[0] if int(node.attrs.get("transB", 0)) else weight.shape[1]
    elif node.op == "ConvTranspose":
        if int(node.attrs.get("group", 1)) != 1:
            return None
        channels = weight.shape[1]
    else:
        channels = weight.shape[0]
    if len(node.inputs) >= 3 and node.inputs[2] is not None and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        if bias is None:
            return None
        if node.op == "Gemm" and bias.size not in (1, channels):
            return None
        bias = np.broadcast_to(bias.reshape(-1), (channels,)).astype(weight.dtype)
    else:
        bias = np.zeros(channels, dtype=weight.dtype)
    return weight, bias


def _output_channels(node: gs.Node, weight: np.ndarray):
    if node.op == "Gemm":
        return (weight.shape[0], 0) if int(node.attrs.get("transB", 0)) else (weight.shape[1], 1)
    if node.op == "ConvTranspose":
        return weight.shape[1], 1
    return weight.shape[0], 0


def set_linear_weights(node: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    base = node.name or node.outputs[0].name
    inputs = list(node.inputs)
    inputs[1] = gs.Constant(f"{base}__weight", np.ascontiguousarray(weight))
    bias_const = gs.Constant(f"{base}__bias", np.ascontiguousarray(bias))
    if len(inputs) >= 3:
        inputs[2] = bias_const
    else:
        inputs.append(bias_const)
    node.inputs = inputs


def _unpadded(conv: gs.Node) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    return all(int(p) == 0 for p in conv.attrs.get("pads", []))
