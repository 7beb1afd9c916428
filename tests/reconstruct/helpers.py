"""Tiny one-node models and the onnxruntime-vs-torch comparison the executor tests share."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxrepq.reconstruct.executor import GraphModule, run_numpy


def one_node_model(op: str, inputs: list, attrs: dict | None = None, outputs=(("y", TensorProto.FLOAT),),
                   opset: int = 13) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``inputs``: (name, array, is_initializer) triples; name "" leaves an optional input out."""
    feeds, graph_inputs, initializers = {}, [], []
    for name, array, is_initializer in inputs:
        if not name:
            continue
        if is_initializer:
            initializers.append(numpy_helper.from_array(np.asarray(array), name))
        else:
            feeds[name] = array
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, array.shape))
    node = helper.make_node(op, [name for name, _, _ in inputs], [name for name, _ in outputs], **(attrs or {}))
    graph = helper.make_graph([node], "one_node", graph_inputs,
                              [helper.make_tensor_value_info(name, elem, None) for name, elem in outputs],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_torch(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_numpy(GraphModule(gs.import_onnx(model)), feeds)


def relative_error(actual: np.ndarray, expected: np.ndarray, floor: float = 1e-12) -> float:
    """Largest absolute difference over the largest reference magnitude (at least ``floor``).

    Integer results must match exactly (1.0 when they do not).
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype.kind != "f":
        return float(np.any(actual.astype(np.int64) != expected.astype(np.int64)))
    assert np.array_equal(np.isnan(actual), np.isnan(expected))
    finite = ~np.isnan(expected)
    diff = np.abs(actual.astype(np.float64)[finite] - expected.astype(np.float64)[finite])
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), floor)
    return float(diff.max(initial=0.0)) / scale


def max_error(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> float:
    expected, actual = run_ort(model, feeds), run_torch(model, feeds)
    return max(relative_error(actual[name], value) for name, value in expected.items())
