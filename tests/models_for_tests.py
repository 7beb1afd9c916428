"""Tiny models built in the tests, and the few helpers every test file uses to run and compare them."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxrepq.passes.base import run_passes

rng = np.random.default_rng(0)


def make_model(nodes, inputs: dict, outputs, initializers: dict | None = None, opset: int = 13) -> onnx.ModelProto:
    """A model from helper nodes; ``inputs`` maps name -> shape (None or str for free dims), ``outputs`` is a
    list of names (shapes left to onnxruntime) or a dict name -> shape (then the ONNX checker passes too)."""
    outputs = outputs if isinstance(outputs, dict) else dict.fromkeys(outputs)
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def weights(*shape, scale: float = 0.5, generator: np.random.Generator | None = None) -> np.ndarray:
    """From the shared generator unless one is given: a test whose thresholds were measured on one
    draw passes its own, so the model does not depend on which tests ran before it."""
    return ((generator or rng).standard_normal(shape) * scale).astype(np.float32)


def positive(*shape) -> np.ndarray:
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)


def run_ort(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:   # the QDQ graph as written, without onnxruntime's integer-kernel fusions
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def apply_passes(model: onnx.ModelProto, passes) -> tuple[onnx.ModelProto, list]:
    graph, records = run_passes(gs.import_onnx(model), passes)
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph)
    return exported, records


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(reference - value).max() / max(np.abs(reference).max(), 1e-12))


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict, rtol: float = 1e-5) -> None:
    expected, actual = run_ort(before, feeds), run_ort(after, feeds)
    assert len(expected) == len(actual)
    for reference, value in zip(expected, actual):
        assert reference.shape == value.shape
        assert relative_error(reference, value) <= rtol


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    noise = np.sum((reference - value) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-30)))


def structured_images(count: int, seed: int, channels: int = 3, size: int = 16) -> np.ndarray:
    """Smooth random images (a coarse field upsampled, plus a little noise): closer to real inputs than noise."""
    generator = np.random.default_rng(seed)
    coarse = generator.standard_normal((count, channels, size // 4, size // 4))
    smooth = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
    return (smooth + 0.1 * generator.standard_normal(smooth.shape)).astype(np.float32)


def export_torch(module, example, dynamic_batch: bool = True, opset: int = 13) -> onnx.ModelProto:
    import torch

    module.eval()
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(module, (torch.from_numpy(example),), buffer, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def conv_bn_model(channels: int = 4, size: int = 8) -> onnx.ModelProto:
    """x -> Conv 3x3 -> BatchNorm -> Identity -> Relu -> y, dynamic batch."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
        helper.make_node("Identity", ["n"], ["i"]),
        helper.make_node("Relu", ["i"], ["y"]),
    ]
    inits = {"w": weights(channels, 3, 3, 3), "b": weights(channels), "gamma": positive(channels),
             "beta": weights(channels), "mean": weights(channels), "var": positive(channels)}
    return make_model(nodes, {"x": ["n", 3, size, size]}, {"y": ["n", channels, size, size]}, inits)
