"""Remove a Relu/Clip that the QuantizeLinear right after it already enforces.

A producer's activation is absorbed into its output range (emit/placement.py), but the op stays in
the graph and the runtime has to see that it does nothing. onnxruntime drops a Clip before a Q only
when the Q's whole integer type lies inside the clip bounds: true for Clip(0, 1) before an 8-bit
[0, 1] grid in uint8, never for a 6-bit grid, whose 64 levels sit in a uint8 that reaches 4x past
the top bound. The integer Clip after the Q (passes/insert_qdq.py) holds the grid, so the float
clip is exact to remove, and the conv before it becomes QLinearConv again.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, sole_consumer
from ..passes.base import PassResult


class DropRedundantClips:
    """Rule: Relu or Clip (constant bounds) -> QuantizeLinear (per-tensor), the activation read by that Q
    alone, and the bounds themselves quantize to the ends of the grid (the Q's type, narrowed by an
    integer Clip right after it): the activation is removed. Exact: a value past a bound then lands on
    the grid's end either way. The test is on the integers QuantizeLinear computes (float32 division,
    rounding), not on dequantized reals: 255 * float32(1/255) is a hair above 1 and still exact.
    A grid that reaches past the upper bound (learned steps) is first shrunk to end on it, when its
    lower end already holds (``_fit_to_upper_bound``)."""

    name = "drop_redundant_clips"

    def __call__(self, graph: gs.Graph) -> PassResult:
        dropped = 0
        for node in [n for n in graph.nodes if n.op in ("Relu", "Clip")]:
            quantizer = sole_consumer(node.outputs[0], graph)
            if quantizer is None or quantizer.op != "QuantizeLinear" or quantizer.inputs[0] is not node.outputs[0]:
                continue
            bounds = _bounds(node)
            if bounds is None:
                continue
            if not _enforced_by(graph, quantizer, bounds) and not _fit_to_upper_bound(graph, quantizer, bounds):
                continue
            quantizer.inputs[0] = node.inputs[0]
            node.outputs = []
            dropped += 1
        if dropped:
            graph.cleanup().toposort()
        return PassResult(graph, bool(dropped),
                          [f"{dropped} Relu/Clip removed: the quantizer after each enforces it"] if dropped else [])


def _bounds(node: gs.Node) -> Optional[tuple[float, float]]:
    if node.op == "Relu":
        return 0.0, np.inf
    values = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        tensor = node.inputs[index] if len(node.inputs) > index else None
        if tensor is None or not tensor.name:
            values.append(default)
            continue
        value = constant_value(tensor)
        if value is None or value.size != 1:
            return None
        values.append(float(value.reshape(())))
    return values[0], values[1]


def _fit_to_upper_bound(graph: gs.Graph, quantizer: gs.Node, bounds: tuple[float, float]) -> bool:
    """Shrink the quantizer's step so that its grid ends at the clip's upper bound, zero point kept.

    Reconstruction's learned steps (LSQ) can grow a clipped tensor's grid past the clip (a [0, 1] gate
    on [0, 1.05]); the top levels then never occur, the clip cannot go, and onnxruntime leaves the conv
    before it in float (PP-OCRv4 det, default recipe: 33 float convs). Values past the bound never reach
    the quantizer, so the finer grid changes only rounding. Done only where the lower end already holds.
    """
    if not np.isfinite(bounds[1]) or bounds[1] <= 0 or len(quantizer.inputs) < 3:
        return False
    scale, zero_point = constant_value(quantizer.inputs[1]), constant_value(quantizer.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return False
    low, high = _grid_ends(graph, quantizer, zero_point)
    zero = float(zero_point.reshape(()))
    if high <= zero or not np.rint(np.float32(bounds[0]) / np.float32(scale.reshape(()))) + zero <= low:
        return False
    fitted = np.float32(bounds[1] / (high - zero))
    while np.rint(np.float32(bounds[1]) / fitted) + zero < high:   # float32 rounding: end exactly on the bound
        fitted = np.nextafter(fitted, np.float32(0))
    quantizer.inputs[1].values = np.array(fitted, dtype=np.float32).reshape(scale.shape)
    return True


def _grid_ends(graph: gs.Graph, quantizer: gs.Node, zero_point: np.ndarray) -> tuple[int, int]:
    """The lowest and highest integer the quantized tensor holds: its type, narrowed by an integer Clip after it."""
    info = np.iinfo(zero_point.dtype)
    low, high = info.min, info.max
    narrow = sole_consumer(quantizer.outputs[0], graph)
    if narrow is not None and narrow.op == "Clip":
        limits = _bounds(narrow)
        if limits is not None:
            low, high = max(low, limits[0]), min(high, limits[1])
    return low, high


def _enforced_by(graph: gs.Graph, quantizer: gs.Node, bounds: tuple[float, float]) -> bool:
    """Whether the quantizer maps the lower bound to its lowest level and the upper to its highest."""
    if len(quantizer.inputs) < 3:
        return False
    scale, zero_point = constant_value(quantizer.inputs[1]), constant_value(quantizer.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return False
    low, high = _grid_ends(graph, quantizer, zero_point)
    step, zero = np.float32(scale.reshape(())), float(zero_point.reshape(()))
    with np.errstate(over="ignore", invalid="ignore"):
        ends = [np.rint(np.float32(bound) / step) + zero for bound in bounds]
    return bool(ends[0] <= low and ends[1] >= high)
