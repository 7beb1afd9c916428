"""Where 8-bit weights keep the whole grid on CPUs whose int8 kernels add pairs in int16, and the
pass that holds their pairs to the limit once rounding is final (search/weight_pairs.py says why).

The scale search already prices the limit in; rounding learned afterwards (reconstruction) moves
integers by one step and can push a pair a step or two past it, which this pass takes back.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, producer
from ..passes.base import PassResult
from ..search.quant_grid import IntGrid
from ..search.weight_pairs import PairLimit, conv_reduction_order, keep_pairs
from .saturation import pair_sum_limit


def pair_limit_for(node: gs.Node, input_index: int, axis: int, activation: IntGrid) -> Optional[PairLimit]:
    """The pair limit of a layer that onnxruntime runs as a u8 x s8 GEMM, or None where its
    reduction order is not known here (such a layer needs the reduced grid instead)."""
    weight = constant_value(node.inputs[input_index]) if input_index < len(node.inputs) else None
    if weight is None or input_index != 1:
        return None
    limit = pair_sum_limit(activation)
    if node.op == "Conv" and weight.ndim >= 3 and axis == 0:
        return PairLimit(limit, conv_reduction_order(weight.shape))
    if node.op in ("MatMul", "Gemm") and weight.ndim == 2:
        reduction_axis = 1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0
        return PairLimit(limit) if axis != reduction_axis else None
    return None


def is_depthwise(node: gs.Node) -> bool:
    """One input and one output channel per group: onnxruntime's depthwise kernel sums in int32."""
    weight = constant_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    return weight is not None and group > 1 and weight.shape[0] == group and weight.shape[1] == 1


class KeepWeightPairs:
    """Hold the listed layers' weight pairs to their limit, moving as few integers as it takes."""

    name = "keep_weight_pairs"

    def __init__(self, layers: Mapping[str, tuple[PairLimit, IntGrid]]):
        self.layers = dict(layers)

    def __call__(self, graph: gs.Graph) -> PassResult:
        moved = checked = 0
        for node in graph.nodes:
            if node.name not in self.layers:
                continue
            quantizer = _weight_quantizer(node)
            if quantizer is None:
                continue
            pairs, grid = self.layers[node.name]
            moved += _hold(quantizer, pairs, grid)
            checked += 1
        notes = [f"{moved} weights moved to keep same-sign pairs within the int16 limit in {checked} layers"]
        return PassResult(graph, moved > 0, notes)


def _weight_quantizer(node: gs.Node) -> Optional[gs.Node]:
    """The QuantizeLinear of a constant behind the DequantizeLinear feeding ``node``'s weight."""
    dequantize = producer(node.inputs[1]) if len(node.inputs) > 1 else None
    quantize = producer(dequantize.inputs[0]) if dequantize is not None and dequantize.op == "DequantizeLinear" \
        else None
    if quantize is None or quantize.op != "QuantizeLinear" or constant_value(quantize.inputs[0]) is None:
        return None
    return quantize


def _hold(quantizer: gs.Node, pairs: PairLimit, grid: IntGrid) -> int:
    weight_tensor = quantizer.inputs[0]
    weight = np.asarray(weight_tensor.values)
    axis = int(quantizer.attrs.get("axis", 1)) % weight.ndim
    scale = np.asarray(constant_value(quantizer.inputs[1]), np.float64).reshape(-1)
    moved_weight = np.moveaxis(weight.astype(np.float64), axis, 0)
    rows = moved_weight.reshape(moved_weight.shape[0], -1)
    steps = np.clip(rows / scale[:, None], grid.qmin, grid.qmax)
    integers = np.rint(steps)
    held = pairs.from_pairs(keep_pairs(pairs.to_pairs(steps), pairs.to_pairs(integers), pairs.limit),
                            rows.shape[1])
    changed = held != integers
    if not changed.any():
        return 0
    rows = np.where(changed, held * scale[:, None], rows)
    weight_tensor.values = np.moveaxis(rows.reshape(moved_weight.shape), 0, axis).astype(weight.dtype)
    return int(changed.sum())
