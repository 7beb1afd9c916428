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
    grid = _grid(graph, quantizer)
    if grid is None or not np.isfinite(bounds[1]) or bounds[1] <= 0:
        return False
    step, zero, low, high = grid
    if high <= zero or _level(bounds[0], step, zero) > low:
        return False
    fitted = np.float32(bounds[1] / (high - zero))
    while _level(bounds[1], fitted, zero) < high:   # float32 rounding: end exactly on the bound
        fitted = np.nextafter(fitted, np.float32(0))
    quantizer.inputs[1].values = np.array(fitted, dtype=np.float32).reshape(quantizer.inputs[1].values.shape)
    return True


def _enforced_by(graph: gs.Graph, quantizer: gs.Node, bounds: tuple[float, float]) -> bool:
    """Whether the quantizer maps the lower bound to its lowest level and the upper to its highest."""
    grid = _grid(graph, quantizer)
    if grid is None:
        return False
    step, zero, low, high = grid
    return bool(_level(bounds[0], step, zero) <= low and _level(bounds[1], step, zero) >= high)


def _grid(graph: gs.Graph, quantizer: gs.Node) -> Optional[tuple[np.float32, float, int, int]]:
    """(step, zero point, lowest and highest integer held) of a per-tensor quantizer; the integers are its
    type's, narrowed by an integer Clip right after it."""
    if len(quantizer.inputs) < 3:
        return None
    scale, zero_point = constant_value(quantizer.inputs[1]), constant_value(quantizer.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    info = np.iinfo(zero_point.dtype)
    low, high = info.min, info.max
    narrow = sole_consumer(quantizer.outputs[0], graph)
    if narrow is not None and narrow.op == "Clip":
        limits = _bounds(narrow)
        if limits is not None:
            low, high = max(low, limits[0]), min(high, limits[1])
    return np.float32(scale.reshape(())), float(zero_point.reshape(())), low, high


def _level(value: float, step: np.float32, zero: float) -> float:
    """The unsaturated integer QuantizeLinear computes for ``value`` (float32 division, round half to even)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.rint(np.float32(value) / step) + zero)
