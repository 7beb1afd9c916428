"""Recognise HardSwish spelled out as elementwise ops and replace it by one op.

paddle2onnx and older torch exports write x * clip(x + 3, 0, 6) / 6 as four or five nodes; at
run time each is a pass over the tensor in float, between the int8 kernels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, is_graph_output
from .base import PassResult


def _scalar(tensor: gs.Tensor) -> Optional[float]:
    value = constant_value(tensor)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _other_input(node: gs.Node, tensor: gs.Tensor) -> Optional[gs.Tensor]:
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is tensor:
        return node.inputs[1]
    if node.inputs[1] is tensor:
        return node.inputs[0]
    return None


class FuseHardSwish:
    """Rewrite ``Mul(x, Clip(x + 3, 0, 6)) / 6`` (Div by 6 or Mul by 1/6, either Mul order) and
    ``Mul(x, HardSigmoid(x, 1/6, 0.5))`` into ``HardSwish(x)`` (opset >= 14), or into the two-op
    HardSigmoid form when the opset is older. Intermediate tensors used elsewhere block the rewrite.
    """

    name = "fuse_hardswish"

    def __call__(self, graph: gs.Graph) -> PassResult:
        fused = 0
        for node in list(graph.nodes):
            match = self._match(graph, node)
            if match is None:
                continue
            x, last, dead = match
            out = last.outputs[0]
            last.outputs = []
            for dead_node in dead:
                dead_node.outputs = []
            if graph.opset >= 14:
                graph.layer(op="HardSwish", name=f"{out.name}__hardswish", inputs=[x], outputs=[out])
            else:
                gate = gs.Variable(f"{out.name}__gate", dtype=x.dtype)
                graph.layer(op="HardSigmoid", name=f"{out.name}__hardsigmoid", inputs=[x], outputs=[gate],
                            attrs={"alpha": 1.0 / 6.0, "beta": 0.5})
                graph.layer(op="Mul", name=f"{out.name}__mul", inputs=[x, gate], outputs=[out])
            fused += 1
        if fused:
            graph.cleanup().toposort()
        return PassResult(graph, fused > 0, [f"{fused} HardSwish patterns fused"] if fused else [])

    def _match(self, graph: gs.Graph, node: gs.Node):
        if node.op == "HardSigmoid":
            return self._match_hardsigmoid(graph, node)
        if node.op != "Add" or _scalar_operand(node) != 3.0:
            return None
        x = node.inputs[0] if _scalar(node.inputs[1]) is not None else node.inputs[1]
        clip = _single_user(graph, node.outputs[0], "Clip")
        if clip is None or len(clip.inputs) < 3 or _scalar(clip.inputs[1]) != 0.0 or _scalar(clip.inputs[2]) != 6.0:
            return None
        mul = _single_user(graph, clip.outputs[0], "Mul")
        if mul is None or _other_input(mul, clip.outputs[0]) is not x:
            return None
        last = _single_user(graph, mul.outputs[0], None)
        if last is None or not _divides_by_six(last, mul.outputs[0]):
            return None
        return x, last, [node, clip, mul]

    def _match_hardsigmoid(self, graph: gs.Graph, node: gs.Node):
        alpha = float(node.attrs.get("alpha", 0.2))
        beta = float(node.attrs.get("beta", 0.5))
        if not (np.isclose(alpha, 1.0 / 6.0, rtol=1e-4) and beta == 0.5):
            return None
        x = node.inputs[0]
        mul = _single_user(graph, node.outputs[0], "Mul")
        if mul is None or _other_input(mul, node.outputs[0]) is not x:
            return None
        return x, mul, [node]


def _scalar_operand(node: gs.Node) -> Optional[float]:
    for tensor in node.inputs:
        value = _scalar(tensor)
        if value is not None:
            return value
    return None


def _single_user(graph: gs.Graph, tensor: gs.Tensor, op: Optional[str]) -> Optional[gs.Node]:
    if len(tensor.outputs) != 1 or is_graph_output(tensor, graph):
        return None
    user = tensor.outputs[0]
    return user if op is None or user.op == op else None


def _divides_by_six(node: gs.Node, tensor: gs.Tensor) -> bool:
    if node.op == "Div" and node.inputs[0] is tensor:
        return _scalar(node.inputs[1]) == 6.0
    if node.op == "Mul":
        other = _other_input(node, tensor)
        value = _scalar(other) if other is not None else None
        return value is not None and np.isclose(value, 1.0 / 6.0, rtol=1e-6)
    return False
