"""Cross-layer equalization: balance per-channel weight ranges across conv pairs.

Merged re-parameterized convs leave some output channels with weights 100x larger than others;
one per-channel scale per output channel handles the first conv, but the next conv sees those
channels through a single per-tensor activation scale. Rescaling channel i of the first conv by
1/s_i and input channel i of the second by s_i changes nothing in float when the activation
between them is positively homogeneous (Relu(x/s) = Relu(x)/s for s > 0), and equalises both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, sole_consumer
from .base import PassResult

# Activations f with f(x / s) = f(x) / s for every s > 0.
_HOMOGENEOUS = ("Relu",)


@dataclass(frozen=True)
class EqualizeConfig:
    max_scale: float = 32.0   # cap on s_i and 1/s_i: beyond it activations inflate (a known CLE failure)
    rounds: int = 3           # chains conv->conv->conv need a few sweeps to settle


class EqualizeCrossLayer:
    """Equalize every Conv -> [Relu | PRelu(slope >= 0) | nothing] -> Conv pair.

    Rules: the first conv's output and the activation's output each have exactly one consumer;
    both convs have constant weights; the first conv's bias (if any) is scaled with it. Relu6 and
    Clip are not homogeneous (their bound would have to move per channel) and HardSwish is not
    either, so those pairs are left alone. Scales are capped at ``max_scale``; capped channels are
    counted in the notes.
    """

    name = "equalize"

    def __init__(self, config: EqualizeConfig = EqualizeConfig()):
        self.config = config

    def __call__(self, graph: gs.Graph) -> PassResult:
        pairs = [pair for node in graph.nodes if node.op == "Conv" and (pair := _pair_after(graph, node))]
        capped = 0
        for _ in range(self.config.rounds):
            for first, second in pairs:
                capped += _equalize(first, second, self.config.max_scale)
        notes = [f"{len(pairs)} conv pairs equalized"] if pairs else []
        if capped:
            notes.append(f"{capped} channel scales capped at {self.config.max_scale:g}")
        return PassResult(graph, bool(pairs), notes)


def _pair_after(graph: gs.Graph, first: gs.Node):
    if len(first.outputs) != 1 or _weights(first) is None:
        return None
    between = sole_consumer(first.outputs[0], graph)
    if between is None:
        return None
    if between.op == "Conv":
        second = between
    elif _homogeneous(between) and len(between.outputs) == 1:
        second = sole_consumer(between.outputs[0], graph)
    else:
        return None
    if second is None or second.op != "Conv" or _weights(second) is None:
        return None
    if second.inputs[0] is not (first.outputs[0] if between is second else between.outputs[0]):
        return None
    channels = _weights(first).shape[0]
    if _weights(second).shape[1] * int(second.attrs.get("group", 1)) != channels:
        return None
    return first, second


def _homogeneous(node: gs.Node) -> bool:
    if node.op in _HOMOGENEOUS:
        return True
    if node.op == "PRelu":
        slope = constant_value(node.inputs[1])
        return slope is not None and bool(np.all(slope >= 0)) and slope.size == 1
    return False


def _weights(node: gs.Node):
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name and \
            constant_value(node.inputs[2]) is None:
        return None
    return weight


def _equalize(first: gs.Node, second: gs.Node, max_scale: float) -> int:
    w1, w2 = _weights(first).astype(np.float64), _weights(second).astype(np.float64)
    channels = w1.shape[0]
    groups = int(second.attrs.get("group", 1))
    per_group_in = w2.shape[1]
    per_group_out = w2.shape[0] // groups
    # range of input channel i in the second conv: its slice in its group's rows
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = np.zeros(channels)
    for i in range(channels):
        g, j = divmod(i, per_group_in)
        r2[i] = np.abs(w2[g * per_group_out:(g + 1) * per_group_out, j]).max()
    valid = (r1 > 0) & (r2 > 0)
    scale = np.ones(channels)
    scale[valid] = np.sqrt(r1[valid] / r2[valid])
    capped = int(np.sum((scale > max_scale) | (scale < 1.0 / max_scale)))
    scale = np.clip(scale, 1.0 / max_scale, max_scale)
    w1 /= scale.reshape(-1, *([1] * (w1.ndim - 1)))
    for i in range(channels):
        g, j = divmod(i, per_group_in)
        w2[g * per_group_out:(g + 1) * per_group_out, j] *= scale[i]
    _set(first, 1, w1.astype(np.float32))
    _set(second, 1, w2.astype(np.float32))
    if len(first.inputs) > 2 and first.inputs[2] is not None and first.inputs[2].name:
        _set(first, 2, (constant_value(first.inputs[2]).astype(np.float64) / scale).astype(np.float32))
    return capped


def _set(node: gs.Node, index: int, value: np.ndarray) -> None:
    suffix = "weight" if index == 1 else "bias"
    inputs = list(node.inputs)
    base = node.name or node.outputs[0].name  # names must be unique across the graph
    inputs[index] = gs.Constant(f"{base}__equalized_{suffix}", np.ascontiguousarray(value))
    node.inputs = inputs
