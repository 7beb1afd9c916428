"""Full-range 8-bit weights with a pair limit instead of the [-64, 64] grid.

The order in which onnxruntime pairs the reduction axis is measured here, on this host: weights
that keep the limit in that order must compute exactly what the QDQ graph says even with every
activation at 255, and weights that break it must saturate exactly where the host lacks VNNI.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig
from onnxrepq.emit.finalize import FoldWeightQuantizers
from onnxrepq.emit.saturation import host_saturates_u8s8, reduced_weight_grid
from onnxrepq.emit.weight_pairs import KeepWeightPairs, is_depthwise, pair_limit_for
from onnxrepq.search.criteria import weight_scales
from onnxrepq.search.quant_grid import activation_grid, weight_grid
from onnxrepq.search.weight_pairs import PairLimit, conv_reduction_order, keep_pairs, pairs_over, pairs_within
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, structured_images

U8 = activation_grid(8, signed=False)
FULL = weight_grid(8)


def _qdq_model(op: str, weight: np.ndarray, input_shape: list[int], out_scale: float, offset: int = 0,
               **attrs) -> onnx.ModelProto:
    """u8 input (scale 1/255: an input of 1.0 is the integer 255) -> op with s8 weights -> u8 output;
    ``offset`` 128: the weights stored as uint8 with that zero point instead."""
    channels = weight.shape[0] if op == "Conv" else weight.shape[0 if attrs.get("transB") else 1]
    axis = 0 if op == "Conv" or attrs.get("transB") else 1
    dtype = np.uint8 if offset else np.int8
    initializers = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array((weight + offset).astype(dtype), "w"),
        numpy_helper.from_array(np.full(channels, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.full(channels, offset, dtype), "w_zero"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=axis),
             helper.make_node(op, ["xd", "wd"], ["y"], **attrs),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _steps_apart(model: onnx.ModelProto, feed: np.ndarray, out_scale: float) -> float:
    """Largest difference, in output steps, between onnxruntime's integer kernels and the QDQ graph."""
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": feed})[0])
    return float(np.abs(outputs[0] - outputs[1]).max() / out_scale)


def _fused_ops(model: onnx.ModelProto, path) -> list[str]:
    """The op types of the graph onnxruntime runs once it has optimized ``model`` (saved at ``path``)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath, options.log_severity_level = str(path), 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def _limited(rows: np.ndarray, pairs: PairLimit) -> np.ndarray:
    """Rows of random weights brought within the limit in ``pairs``' order (targets = the weights)."""
    paired = pairs.to_pairs(rows.astype(np.float64))
    return pairs.from_pairs(keep_pairs(paired, paired, pairs.limit), rows.shape[1])


CASES = [  # op, weight shape, input shape, attributes
    ("Conv", (32, 24, 3, 3), [1, 24, 8, 8], {"pads": [1, 1, 1, 1]}),
    ("Conv", (16, 3, 3, 3), [1, 3, 8, 8], {}),                      # odd channels: pairs straddle taps
    ("Conv", (16, 4, 1, 2), [1, 8, 6, 6], {"group": 2}),            # grouped: pairs within a group
    ("MatMul", (40, 24), [16, 40], {}),
    ("Gemm", (24, 40), [16, 40], {"transB": 1}),
    ("Gemm", (40, 24), [16, 40], {}),
]


@pytest.mark.parametrize("op, shape, input_shape, attrs", CASES)
def test_the_pair_order_is_onnxruntimes(op, shape, input_shape, attrs):
    generator = np.random.default_rng(0)
    weight = generator.integers(-127, 128, size=shape)
    pairs = PairLimit(32767 // U8.qmax, conv_reduction_order(shape) if op == "Conv" else None)
    axis = 0 if op == "Conv" or attrs.get("transB") else 1
    rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    assert not pairs_within(pairs.to_pairs(rows), pairs.limit)
    held = np.moveaxis(_limited(rows, pairs).reshape(np.moveaxis(weight, axis, 0).shape), 0, axis)
    assert pairs_within(pairs.to_pairs(np.moveaxis(held, axis, 0).reshape(rows.shape)), pairs.limit)
    feed = np.ones(input_shape, np.float32)   # every activation at 255: the worst case for a pair
    out_scale = 0.01 * np.abs(rows.sum(axis=1)).max() / 100   # the largest output about 100 steps from 0
    # a step here and there is requantization rounding; saturation is tens to hundreds of steps
    assert _steps_apart(_qdq_model(op, held, input_shape, out_scale, **attrs), feed, out_scale) <= 1.0
    broken = _steps_apart(_qdq_model(op, weight, input_shape, out_scale, **attrs), feed, out_scale)
    assert (broken > 3.0) == host_saturates_u8s8()


@pytest.mark.parametrize("op, shape, input_shape, attrs", CASES)
def test_uint8_weights_take_kernels_that_do_not_saturate(op, shape, input_shape, attrs, tmp_path):
    """The same full-range weights stored as uint8 with zero point 128 ("unsigned"): onnxruntime still
    fuses the layer into its integer kernel, and computes what the QDQ graph says at every weight."""
    weight = np.random.default_rng(0).integers(-127, 128, size=shape)
    axis = 0 if op == "Conv" or attrs.get("transB") else 1
    out_scale = 0.01 * np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).sum(axis=1)).max() / 100
    feed = np.ones(input_shape, np.float32)
    model = _qdq_model(op, weight, input_shape, out_scale, offset=128, **attrs)
    assert _steps_apart(model, feed, out_scale) <= 1.0
    fused = _fused_ops(model, tmp_path / "optimized.onnx")
    assert {"QLinearConv", "QLinearMatMul", "QGemm"} & set(fused), fused
    assert fused.count("DequantizeLinear") == 1, fused   # the output's: the weight is not dequantized in float


def test_depthwise_convs_sum_in_int32():
    weight = np.full((8, 1, 3, 3), 127)
    model = _qdq_model("Conv", weight, [1, 8, 6, 6], 0.1, group=8)
    assert _steps_apart(model, np.ones((1, 8, 6, 6), np.float32), 0.1) <= 1.0


def test_keep_pairs_moves_only_pairs_over_the_limit_and_splits_them_closest():
    targets = np.array([[100.2, 90.6, 127.0, -127.0, -70.0, -70.4, 3.0, 5.0]])
    integers = np.rint(targets)
    held = keep_pairs(targets, integers, 128)
    # (100.2, 90.6): a = (100.2 - 90.6 + 128) / 2 = 68.8 -> 69, 59; opposite signs and small pairs stay
    np.testing.assert_array_equal(held, [[69, 59, 127, -127, -64, -64, 3, 5]])
    assert pairs_within(held, 128)


def test_the_paired_scale_search_is_never_worse_than_the_reduced_grid():
    generator = np.random.default_rng(1)
    weight = generator.standard_t(3, size=(32, 16, 3, 3)).astype(np.float32)   # heavy tails, as merged branches
    pairs = PairLimit(128, conv_reduction_order(weight.shape))
    reduced = reduced_weight_grid(U8, FULL)
    rows = weight.reshape(32, -1).astype(np.float64)

    def error(scale, grid, limit):
        steps = np.clip(rows / scale[:, None], grid.qmin, grid.qmax)
        integers = np.rint(steps)
        if limit is not None:
            integers = limit.from_pairs(keep_pairs(limit.to_pairs(steps), limit.to_pairs(integers), 128), 144)
        return ((rows - integers * scale[:, None]) ** 2).sum(axis=1)

    paired_error = error(weight_scales(weight, 0, "mse", FULL, pairs).astype(np.float64), FULL, pairs)
    reduced_error = error(weight_scales(weight, 0, "mse", reduced).astype(np.float64), reduced, None)
    assert np.all(paired_error <= reduced_error * (1 + 1e-6))
    assert paired_error.sum() < 0.5 * reduced_error.sum()   # most of the lost bit comes back


def _conv_graph(weight: np.ndarray, scale: np.ndarray) -> gs.Graph:
    x = gs.Variable("x", np.float32, [1, weight.shape[1], 5, 5])
    y = gs.Variable("y", np.float32)
    float_weight = gs.Constant("w_float", weight)
    scale_constant = gs.Constant("w_scale", scale.astype(np.float32))
    zero = gs.Constant("w_zero", np.zeros(len(scale), np.int8))
    quantized, restored = gs.Variable("w_quantized", np.int8), gs.Variable("w_dequantized", np.float32)
    nodes = [gs.Node("QuantizeLinear", "wq", {"axis": 0}, [float_weight, scale_constant, zero], [quantized]),
             gs.Node("DequantizeLinear", "wdq", {"axis": 0}, [quantized, scale_constant, zero], [restored]),
             gs.Node("Conv", "conv", {}, [x, restored], [y])]
    return gs.Graph(nodes, [x], [y], opset=13)


def test_keep_weight_pairs_pass_holds_the_folded_integers():
    generator = np.random.default_rng(2)
    scale = np.full(6, 0.01)
    weight = (generator.integers(-127, 128, size=(6, 4, 3, 3)) * 0.01 + generator.normal(0, 0.002, (6, 4, 3, 3)))
    graph = _conv_graph(weight.astype(np.float32), scale)
    pairs = PairLimit(128, conv_reduction_order(weight.shape))
    before = np.clip(np.rint(weight / 0.01), -127, 127)
    graph = KeepWeightPairs({"conv": (pairs, FULL)})(graph).graph
    graph = FoldWeightQuantizers()(graph).graph
    folded = next(n for n in graph.nodes if n.op == "DequantizeLinear").inputs[0].values.astype(np.int64)
    rows = folded.reshape(6, -1)
    assert pairs_within(pairs.to_pairs(rows), 128)
    ordered_before = pairs.to_pairs(before.reshape(6, -1))
    untouched = np.repeat(~pairs_over(ordered_before, 128), 2, axis=1)
    np.testing.assert_array_equal(pairs.to_pairs(rows)[untouched], ordered_before[untouched])


def test_which_layers_get_a_pair_limit():
    conv = gs.Node("Conv", "c", {}, [gs.Variable("x1", np.float32), gs.Constant("w1", np.ones((8, 4, 3, 3), np.float32))],
                   [gs.Variable("y1", np.float32)])
    pairs = pair_limit_for(conv, 1, 0, U8)
    assert pairs.limit == 128 and not is_depthwise(conv)
    np.testing.assert_array_equal(pairs.order[:5], [0, 9, 18, 27, 1])   # channels fastest within a tap
    gemm = gs.Node("Gemm", "g", {"transB": 1}, [gs.Variable("x3", np.float32), gs.Constant("w3", np.ones((8, 4),
                                                                                                       np.float32))],
                   [gs.Variable("y3", np.float32)])
    assert pair_limit_for(gemm, 1, 0, U8).order is None
    assert pair_limit_for(gemm, 1, 1, U8) is None                         # scales along K: not a channel row
    assert pair_limit_for(conv, 1, 0, activation_grid(7, signed=False)).limit == 32767 // 127
    weight = gs.Constant("w", np.ones((4, 4), np.float32))
    left = gs.Node("MatMul", "left", {}, [weight, gs.Variable("x", np.float32)], [gs.Variable("y", np.float32)])
    assert pair_limit_for(left, 0, 1, U8) is None          # the weight on the left: not a u8 x s8 GEMM B
    conv = gs.Node("Conv", "dw", {"group": 4}, [gs.Variable("x2", np.float32), gs.Constant("w2", np.ones((4, 1, 3, 3),
                                                                                                       np.float32))],
                   [gs.Variable("y2", np.float32)])
    assert is_depthwise(conv)


def _mobile_net_at(weight_range: str):
    """(calibration images, the fast result, the weight-range pass notes) for MobileBlocksNet."""
    calibration = structured_images(12, seed=5)
    model = export_torch(MobileBlocksNet(), calibration[:1])
    result = quantize_with_result(model, calibration, QuantConfig(weight_range=weight_range, fast=True))
    notes = " ".join(note for record in result.passes if record.name == "weight_range" for note in record.notes)
    return calibration, result, notes


def test_paired_models_use_the_full_grid_and_say_so():
    _, result, notes = _mobile_net_at("paired")
    assert "full 8-bit grid" in notes and "held to [-64, 64]" not in notes
    assert {row["weight_bits"] for row in result.layers if "weight_bits" in row} == {8}
    graph = gs.import_onnx(result.model)
    reached = 0
    for node in graph.nodes:
        if node.op != "Conv" or not isinstance(node.inputs[1], gs.Variable):
            continue
        dequantize = node.inputs[1].inputs[0]
        if dequantize.op != "DequantizeLinear":
            continue
        integers = dequantize.inputs[0].values.astype(np.int64)
        reached = max(reached, int(np.abs(integers).max()))
        rows = integers.reshape(integers.shape[0], -1)
        if not (integers.shape[1] == 1 and int(node.attrs.get("group", 1)) == integers.shape[0] > 1):
            pairs = PairLimit(128, conv_reduction_order(integers.shape))
            assert pairs_within(pairs.to_pairs(rows), 128), node.name
    assert reached == 127


def test_unsigned_models_store_full_grid_gemm_weights_as_uint8_and_run_them_exactly():
    calibration, result, notes = _mobile_net_at("unsigned")
    assert "stored as uint8 with zero point 128" in notes and "held to [-64, 64]" not in notes
    graph = gs.import_onnx(result.model)
    storage, reached = {}, 0
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not isinstance(node.inputs[1], gs.Variable):
            continue
        dequantize = node.inputs[1].inputs[0]
        integers, zero_point = dequantize.inputs[0].values, dequantize.inputs[2].values
        depthwise = integers.shape[1] == 1 and int(node.attrs.get("group", 1)) == integers.shape[0] > 1
        storage[node.name] = (integers.dtype, depthwise)
        assert np.all(zero_point == (0 if depthwise else 128)), node.name
        reached = max(reached, int(np.abs(integers.astype(np.int64) - zero_point.reshape(
            (-1,) + (1,) * (integers.ndim - 1))).max()))
    assert {dtype for dtype, depthwise in storage.values() if not depthwise} == {np.dtype(np.uint8)}
    assert {dtype for dtype, depthwise in storage.values() if depthwise} == {np.dtype(np.int8)}
    assert reached == 127
    rows = [row for row in result.layers if "weight_storage" in row]
    assert any(row["weight_storage"] == "uint8 [1, 255] zero point 128" for row in rows)
    # onnxruntime's fused integer kernels compute what the QDQ graph says (on a host that saturates
    # u8 x s8 pairs too); every activation near its top is the case a saturating pair would miss
    feed = {"x": np.clip(calibration[:4] * 4.0, -3.0, 3.0).astype(np.float32)}
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feed)[0])
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-3 * np.abs(outputs[0]).max()
