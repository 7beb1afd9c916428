"""HardSigmoid and HardSwish rewritten as a 1x1 conv and a clip, for runtimes with no integer kernel for them.

onnxruntime CPU has no int8 HardSigmoid/HardSwish: each one is a float island (DequantizeLinear,
the op, QuantizeLinear) between int8 kernels. On PP-OCRv4 det those islands were 7 of 43 ms.
HardSigmoid(x) = Clip(alpha * x + beta, 0, 1) is affine before its clip, and an affine map per
channel is a depthwise 1x1 conv, which onnxruntime runs as QLinearConv; the clip then costs
nothing: the quantizer after it takes a range inside [0, 1] and saturates there (placement
absorbs Clip into the producer's output range). Both rewrites are exact in float.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph.patterns import is_graph_output, sole_consumer
from .base import PassResult
from .fold_affine import linear_weights, set_linear_weights

_DEFAULTS = {"HardSigmoid": (0.2, 0.5), "HardSwish": (1.0 / 6.0, 0.5)}


class HardGatesAsConv:
    """Rules, for each HardSigmoid and HardSwish on a float tensor:
    1. HardSigmoid whose input a Conv writes and nothing else reads (the squeeze-excite gate):
       alpha and beta fold into that conv's weight and bias; the HardSigmoid becomes Clip(0, 1).
    2. Otherwise, on a 4-d tensor with a known channel count: a depthwise 1x1 Conv (weight alpha,
       bias beta) is inserted and followed by Clip(0, 1); a HardSwish becomes x * that gate (Mul,
       which onnxruntime runs as QLinearMul).
    Left alone, with the reason in the notes: other ranks and unknown channel counts (Conv needs
    them), and gates on the graph output (no quantizer after them to saturate).
    """

    name = "hard_gates_as_conv"

    def __call__(self, graph: gs.Graph) -> PassResult:
        folded = inserted = 0
        refused: dict[str, int] = {}
        shapes: Optional[dict[str, list]] = None
        for node in [n for n in graph.nodes if n.op in _DEFAULTS]:
            x, out = node.inputs[0], node.outputs[0]
            if x.dtype not in (None, np.float32) or is_graph_output(out, graph):
                refused["on a graph output or not float"] = refused.get("on a graph output or not float", 0) + 1
                continue
            alpha = float(node.attrs.get("alpha", _DEFAULTS[node.op][0]))
            beta = float(node.attrs.get("beta", _DEFAULTS[node.op][1]))
            if node.op == "HardSigmoid" and _fold_into_producer(graph, node, alpha, beta):
                folded += 1
                continue
            if shapes is None:
                shapes = _inferred_shapes(graph)
            channels = _channels(x, shapes)
            if channels is None:
                refused["not 4-d with a known channel count"] = refused.get(
                    "not 4-d with a known channel count", 0) + 1
                continue
            _insert_depthwise_gate(graph, node, channels, alpha, beta)
            inserted += 1
        if folded or inserted:
            graph.cleanup().toposort()
        notes = []
        if folded:
            notes.append(f"{folded} HardSigmoid folded into the conv before them (now Clip(0, 1))")
        if inserted:
            notes.append(f"{inserted} HardSigmoid/HardSwish as a depthwise 1x1 conv and Clip(0, 1)")
        notes += [f"{count} left as they are: {why}" for why, count in refused.items()]
        return PassResult(graph, bool(folded or inserted), notes)


def _fold_into_producer(graph: gs.Graph, node: gs.Node, alpha: float, beta: float) -> bool:
    x = node.inputs[0]
    conv = x.inputs[0] if len(x.inputs) == 1 else None
    if conv is None or conv.op != "Conv" or sole_consumer(x, graph) is not node or len(conv.outputs) != 1:
        return False
    weights = linear_weights(conv)
    if weights is None:
        return False
    weight, bias = weights
    set_linear_weights(conv, (weight.astype(np.float64) * alpha).astype(weight.dtype),
                       (bias.astype(np.float64) * alpha + beta).astype(weight.dtype))
    _become_unit_clip(node, x)
    return True


def _insert_depthwise_gate(graph: gs.Graph, node: gs.Node, channels: int, alpha: float, beta: float) -> None:
    x, base = node.inputs[0], node.outputs[0].name   # tensor names are unique; node names may be empty
    affine = gs.Variable(f"{base}__gate_affine", dtype=np.float32)
    graph.layer(op="Conv", name=f"{base}__gate_conv", outputs=[affine], attrs={"group": channels}, inputs=[
        x, gs.Constant(f"{base}__gate_weight", np.full((channels, 1, 1, 1), alpha, np.float32)),
        gs.Constant(f"{base}__gate_bias", np.full(channels, beta, np.float32))])
    if node.op == "HardSigmoid":
        _become_unit_clip(node, affine)
        return
    gate = gs.Variable(f"{base}__gate", dtype=np.float32)
    graph.layer(op="Clip", name=f"{base}__gate_clip", outputs=[gate], inputs=[affine, *_unit_bounds(base)])
    node.op, node.attrs, node.inputs = "Mul", {}, [x, gate]


def _become_unit_clip(node: gs.Node, source: gs.Tensor) -> None:
    node.op, node.attrs = "Clip", {}
    node.inputs = [source, *_unit_bounds(node.outputs[0].name)]


def _unit_bounds(base: str) -> list[gs.Constant]:
    return [gs.Constant(f"{base}__clip_min", np.array(0, np.float32)),
            gs.Constant(f"{base}__clip_max", np.array(1, np.float32))]


def _inferred_shapes(graph: gs.Graph) -> dict[str, list]:
    """Shapes onnx infers for the graph as it stands (exported graphs often carry none)."""
    try:
        model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph), strict_mode=False)
    except Exception:
        return {}
    found = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if value.type.tensor_type.HasField("shape"):
            found[value.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in value.type.tensor_type.shape.dim]
    return found


def _channels(tensor: gs.Tensor, shapes: dict[str, list]) -> Optional[int]:
    """Dim 1 of a 4-d tensor, from its own shape or else onnx's inference."""
    for shape in (tensor.shape, shapes.get(tensor.name)):
        if shape is not None and len(shape) == 4 and isinstance(shape[1], (int, np.integer)) and shape[1] > 0:
            return int(shape[1])
    return None
