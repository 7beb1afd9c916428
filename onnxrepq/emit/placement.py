"""Where Q/DQ pairs go: which activations are quantized, which weights, and which share params.

The plan is demand-driven. A tensor is quantized when an integer kernel needs it: the inputs
and (activation-absorbed) outputs of anchor ops (Conv, Gemm, MatMul; the output only where the
anchor's kernel needs it or an integer op reads it), then, to a fixed point, the outputs of
integer-capable ops whose inputs are all quantized and whose result an integer op reads, directly
or through data-movement ops. Nothing else is touched, so float-only regions (layer norms,
softmax, heads) keep full precision instead of paying a Q/DQ round trip that buys no kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, is_graph_output
from .targets import TargetRules


@dataclass(frozen=True)
class WeightSlot:
    node: str
    input_index: int
    axis: int          # per-channel axis of the weight (output channels)


@dataclass
class QuantPlan:
    activations: list[str] = field(default_factory=list)
    weights: list[WeightSlot] = field(default_factory=list)
    # tensor -> the tensor whose scale and zero point it must reuse (passthrough ops)
    shared: dict[str, str] = field(default_factory=dict)
    # node name -> why it stays float although it is an anchor
    left_float: dict[str, str] = field(default_factory=dict)
    # anchors with a quantized weight but float input and output (int4 MatMulNBits, emit/int4_matmul.py)
    weight_only: frozenset[str] = frozenset()

    def leader(self, tensor: str) -> str:
        while tensor in self.shared:
            tensor = self.shared[tensor]
        return tensor


def plan_quantization(graph: gs.Graph, rules: TargetRules, float_tensors: set[str],
                      keep_float: tuple[str, ...] = (), weight_only: frozenset[str] = frozenset()) -> QuantPlan:
    """Plan Q/DQ placement. ``float_tensors`` names the activations observed to be float32.

    ``weight_only`` names anchors whose kernel takes float activations (MatMulNBits): their weight
    is planned, but they ask for no Q/DQ on their input or output, and do not count as integer
    consumers of what feeds them.
    """
    plan = QuantPlan(weight_only=frozenset(weight_only))
    quantized: dict[str, None] = {}  # ordered set
    reaches: dict[str, bool] = {}    # memo of _reaches_integer_op: it depends on the graph and rules only

    def mark(tensor: gs.Tensor) -> None:
        if tensor.name in float_tensors and not isinstance(tensor, gs.Constant):
            quantized.setdefault(tensor.name)

    anchors_done: set[str] = set()
    for node in graph.nodes:
        if node.op not in rules.anchors:
            continue
        if _kept_float(node, keep_float):
            plan.left_float[node.name] = "kept in float by the recipe"
            continue
        slot = _weight_slot(node)
        activations = [t for t in node.inputs[:2] if not isinstance(t, gs.Constant) and t.name]
        if slot is None and not (node.op == "MatMul" and len(activations) == 2):
            plan.left_float[node.name] = "weight is not a constant float tensor of the expected rank"
            continue
        if any(t.name not in float_tensors for t in activations):
            plan.left_float[node.name] = "input is not float32"
            continue
        if slot is not None:
            plan.weights.append(slot)
        if slot is not None and node.name in plan.weight_only:
            continue
        for tensor in activations:
            mark(tensor)
        output = _absorbed_output(graph, node, rules)
        if rules.quantize_anchor_outputs and not is_graph_output(output, graph) and (
                node.op not in rules.float_output_anchors
                or _reaches_integer_op(output, graph, rules, keep_float, plan.weight_only, reaches)):
            mark(output)
        anchors_done.add(node.name)
    if rules.quantize_residual_inputs:
        for tensor in _residual_inputs(graph, anchors_done):
            mark(tensor)

    changed = True
    while changed:
        changed = False
        for node in graph.nodes:
            if len(node.outputs) != 1 or node.outputs[0].name in plan.shared or _kept_float(node, keep_float):
                continue
            output = node.outputs[0]
            inputs = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
            if not inputs or any(t.name not in float_tensors for t in [output, *inputs]):
                continue
            if is_graph_output(output, graph) or not _reaches_integer_op(
                    output, graph, rules, keep_float, plan.weight_only, reaches):
                continue
            pending = [t for t in inputs if t.name not in quantized]
            if pending and not (node.op in rules.int8_ops and all(
                    _float_activation_output(t, graph, rules, quantized, keep_float) for t in pending)):
                continue
            if node.op in rules.passthrough_ops:
                # also when an anchor already asked for the output: the pair drops only with equal params
                plan.shared[output.name] = inputs[0].name
            elif node.op not in rules.int8_ops or (output.name in quantized and not pending):
                continue
            for tensor in pending + [output]:
                quantized.setdefault(tensor.name)
            changed = True
    plan.activations = list(quantized)
    return plan


def _reaches_integer_op(tensor: gs.Tensor, graph: gs.Graph, rules: TargetRules, keep_float,
                        weight_only: frozenset[str], memo: dict[str, bool]) -> bool:
    """Whether an integer kernel would read ``tensor`` quantized: an anchor directly, or an int8 or
    data-movement op whose own output gets to one. A chain that ends in float ops (a Softmax, a
    graph output) buys no kernel, only a rounding (the logits of a recognizer, behind a Flatten)."""
    if tensor.name not in memo:
        memo[tensor.name] = False    # a graph is acyclic; this only stops a malformed one looping
        memo[tensor.name] = any(
            consumer.op in rules.anchors
            or (consumer.op in rules.int8_ops or consumer.op in rules.passthrough_ops)
            and len(consumer.outputs) == 1 and not is_graph_output(consumer.outputs[0], graph)
            and _reaches_integer_op(consumer.outputs[0], graph, rules, keep_float, weight_only, memo)
            for consumer in tensor.outputs
            if not _kept_float(consumer, keep_float) and consumer.name not in weight_only)
    return memo[tensor.name]


def _float_activation_output(tensor: gs.Tensor, graph: gs.Graph, rules: TargetRules, quantized, keep_float) -> bool:
    """Whether ``tensor`` is the only output of a one-input float op (HardSigmoid, ...) on quantized data.

    Quantizing it costs one Q/DQ and lets the integer op it feeds (the Mul of an SE block or a
    HardSwish, x * HardSigmoid(...)) take all-quantized inputs and become a QLinear op.
    """
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op in rules.anchors or len(node.outputs) != 1 or is_graph_output(tensor, graph):
        return False
    inputs = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
    return len(inputs) == 1 and inputs[0].name in quantized and not _kept_float(node, keep_float)


def _residual_inputs(graph: gs.Graph, quantized_anchors: set[str]) -> list[gs.Tensor]:
    """The identity input of each Add whose other input a quantized conv writes directly.

    TensorRT fuses such an Add into the conv's epilogue when the identity input is quantized and
    the conv-to-Add edge is not (TensorRT developer guide, "Q/DQ layer-placement recommendations").
    """
    found = []
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or any(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        from_conv = [len(t.inputs) == 1 and t.inputs[0].name in quantized_anchors for t in node.inputs]
        if any(from_conv):
            found.append(node.inputs[1] if from_conv[0] else node.inputs[0])
    return found


def _kept_float(node: gs.Node, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(node.name, p) or fnmatchcase(node.op, p) for p in patterns)


def _absorbed_output(graph: gs.Graph, node: gs.Node, rules: TargetRules) -> gs.Tensor:
    """The tensor to quantize after an anchor: past a Relu/Clip that is its sole consumer."""
    output = node.outputs[0]
    if len(output.outputs) == 1 and not is_graph_output(output, graph):
        follower = output.outputs[0]
        if follower.op in rules.absorbed_activations and follower.inputs[0] is output and _clip_is_static(follower):
            return follower.outputs[0]
    return output


def _clip_is_static(node: gs.Node) -> bool:
    if node.op != "Clip":
        return True
    bounds = [constant_value(t) for t in node.inputs[1:3] if t is not None and t.name]
    return all(b is not None for b in bounds)


def _weight_slot(node: gs.Node) -> Optional[WeightSlot]:
    if len(node.inputs) < 2:
        return None
    weight = constant_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return None
    if node.op in ("Conv",) and weight.ndim >= 3:
        return WeightSlot(node.name, 1, 0)
    if node.op == "ConvTranspose" and weight.ndim >= 3 and int(node.attrs.get("group", 1)) == 1:
        return WeightSlot(node.name, 1, 1)
    if node.op == "Gemm" and weight.ndim == 2:
        return WeightSlot(node.name, 1, 0 if int(node.attrs.get("transB", 0)) else 1)
    if node.op == "MatMul" and weight.ndim == 2:
        return WeightSlot(node.name, 1, 1)
    return None


def relead(by_leader: dict, before: QuantPlan, after: QuantPlan) -> dict:
    """``by_leader`` (keyed by the leaders of plan ``before``) keyed by the leaders of ``after``, which
    quantizes a subset of the tensors. Where a passthrough chain lost its head, the tensor now leading it
    takes what its old leader had: a passthrough op moves the values unchanged."""
    return {after.leader(name): by_leader[before.leader(name)] for name in after.activations
            if before.leader(name) in by_leader}
