"""Constant nodes become initializers, so every later pass sees weights in one form."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .base import PassResult


class ConstantsToInitializers:
    """Replace each ``Constant`` node (value, value_float(s), value_int(s)) by a ``gs.Constant``.

    Exporters (paddle2onnx, torch) emit weights and scalars as Constant nodes; the folding passes
    only recognise ``gs.Constant`` inputs. Sparse or string constants are left alone.
    """

    name = "constants_to_initializers"

    def __call__(self, graph: gs.Graph) -> PassResult:
        converted = 0
        for node in list(graph.nodes):
            if node.op != "Constant" or len(node.outputs) != 1:
                continue
            value = _constant_node_value(node)
            if value is None:
                continue
            out = node.outputs[0]
            const = gs.Constant(out.name, value)
            for consumer in list(out.outputs):
                consumer.inputs = [const if inp is out else inp for inp in consumer.inputs]
            if any(o is out for o in graph.outputs):
                continue  # a constant graph output keeps its node; cleanup will not drop it
            node.outputs = []
            converted += 1
        graph.cleanup()
        return PassResult(graph, converted > 0, [f"{converted} Constant nodes made initializers"] if converted else [])


def _constant_node_value(node: gs.Node):
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        try:
            return numpy_helper.to_array(value)
        except Exception:
            return None
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None
