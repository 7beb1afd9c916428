"""The few graph questions every pass asks: is this a constant, who consumes this tensor."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_graphsurgeon as gs


def constant_value(tensor: gs.Tensor) -> Optional[np.ndarray]:
    """The tensor's value when it is known before running the graph, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def sole_consumer(tensor: gs.Tensor, graph: gs.Graph) -> Optional[gs.Node]:
    """The one node reading ``tensor``, when it is not also a graph output."""
    if len(tensor.outputs) != 1 or any(out is tensor for out in graph.outputs):
        return None
    return tensor.outputs[0]


def producer(tensor: gs.Tensor) -> Optional[gs.Node]:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(out is tensor for out in graph.outputs)


def channel_vector(value: np.ndarray, channels: int, channel_axis: int = 1, rank: int = 4) -> Optional[np.ndarray]:
    """``value`` as one number per channel when it broadcasts only along the channel axis.

    Mul/Add by a constant folds into a conv only when the constant is a scalar or varies along
    the channel axis alone; anything else (spatial or batch variation) cannot become a bias.
    """
    value = np.asarray(value, dtype=np.float64)
    if value.size == 1:
        return np.full(channels, value.reshape(()).item())
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    for axis, dim in enumerate(shape):
        if axis != channel_axis and dim != 1:
            return None
    if shape[channel_axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).copy()


def replace_tensor_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer (and graph output slot) of ``old`` read ``new`` instead."""
    for node in list(old.outputs):
        node.inputs = [new if inp is old else inp for inp in node.inputs]
    graph.outputs = [new if out is old else out for out in graph.outputs]


def bypass_node(graph: gs.Graph, node: gs.Node, source: Optional[gs.Tensor] = None) -> None:
    """Drop a single-input, single-output node by wiring its consumers to its input.

    A graph output keeps its name: when the dropped node produced one, the source tensor takes
    over that name (possible only when the source is an ordinary intermediate tensor).
    """
    source = node.inputs[0] if source is None else source
    result = node.outputs[0]
    keeps_output_name = (is_graph_output(result, graph) and not isinstance(source, gs.Constant)
                         and not is_graph_output(source, graph)
                         and not any(source is inp for inp in graph.inputs))
    if keeps_output_name:
        name = result.name
        result.name = f"{name}__bypassed"
        source.name = name
        source.dtype = result.dtype if result.dtype is not None else source.dtype
        source.shape = result.shape if result.shape is not None else source.shape
    replace_tensor_uses(graph, result, source)
    node.outputs = []


def can_bypass(graph: gs.Graph, node: gs.Node, source: Optional[gs.Tensor] = None) -> bool:
    """A node can go when its output is not a graph output that would lose its name or dtype."""
    source = node.inputs[0] if source is None else source
    result = node.outputs[0]
    if not is_graph_output(result, graph):
        return True
    return not (isinstance(source, gs.Constant) or is_graph_output(source, graph)
                or any(source is inp for inp in graph.inputs))
