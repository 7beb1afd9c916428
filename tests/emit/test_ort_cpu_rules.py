"""The onnxruntime CPU facts in onnxrepq/emit/targets.py, checked on tiny QDQ graphs built here.

Each test builds x -> Q -> DQ -> op(s) -> Q -> DQ -> y and asserts which nodes onnxruntime's
optimized graph (ORT_ENABLE_ALL) keeps. Findings on onnxruntime 1.32 worth remembering:
- a DQ shared by two consumers is as good as one DQ per consumer: both convs still become
  QLinearConv (the runtime duplicates shared DQs itself), so InsertQDQ's one-DQ-per-consumer
  is no longer needed on this version, only harmless;
- Gemm with a DQ weight and a float output still becomes QGemm (float output variant);
- MatMul with a constant int8 weight per-column (axis=1) becomes QLinearMatMul with an output Q
  and MatMulIntegerToFloat without one, and so does a MatMul of two quantized activations;
- ConvTranspose stays float whatever the weight layout (per-channel axis 0 or 1, per-tensor);
- HardSwish and HardSigmoid have no integer kernel: they stay float between DQ and Q
  (HardSwish is run as HardSigmoid + Mul).
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrepq
from onnxrepq.config import QuantConfig
from onnxrepq.emit.coverage import kernel_coverage, optimized_model
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, make_model, structured_images

rng = np.random.default_rng(0)
STEP = 0.05  # activation scale: uint8 range [0, 12.75] with zero point 0


def activation_params(zero_point: int = 0, scale: float = STEP, dtype=np.uint8) -> dict:
    return {"act_scale": np.float32(scale), "act_zero": np.array(zero_point, dtype)}


def qdq(source: str, target: str, scale: str = "act_scale", zero: str = "act_zero") -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [source, scale, zero], [f"{target}_q"]),
            helper.make_node("DequantizeLinear", [f"{target}_q", scale, zero], [target])]


def weight_dq(name: str, weight: np.ndarray, axis: int | None) -> tuple[dict, list[onnx.NodeProto]]:
    """An int8 symmetric weight behind a DequantizeLinear: per-channel on ``axis``, per-tensor when None."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis) if axis is not None else None
    scale = (np.abs(weight).max(axis=reduce) / 127).astype(np.float32)
    shape = [1] * weight.ndim
    if axis is not None:
        shape[axis] = -1
    quantized = np.clip(np.rint(weight / np.reshape(scale, shape)), -127, 127).astype(np.int8)
    inits = {f"{name}_int8": quantized, f"{name}_scale": scale, f"{name}_zero": np.zeros_like(scale, np.int8)}
    attrs = {"axis": axis} if axis is not None else {}
    return inits, [helper.make_node("DequantizeLinear", list(inits), [name], **attrs)]


def optimized_ops(nodes, inits: dict, inputs: dict | None = None, opset: int = 13) -> collections.Counter:
    model = make_model(nodes, inputs or {"x": [1, 4, 8, 8]}, ["y"], inits, opset=opset)
    return collections.Counter(node.op_type for node in optimized_model(model).graph.node)


def conv_then(activation: list[onnx.NodeProto], inits: dict, out_scale: str = "act_scale",
              out_zero: str = "act_zero", axis: int = 0) -> collections.Counter:
    """x -> Q/DQ -> Conv (int8 weight, per-channel on ``axis``) -> activation -> Q/DQ -> y."""
    weight_inits, weight_nodes = weight_dq("w", rng.standard_normal((8, 4, 3, 3)).astype(np.float32), axis)
    last = activation[-1].output[0] if activation else "conv"
    nodes = [*qdq("x", "xd"), *weight_nodes, helper.make_node("Conv", ["xd", "w"], ["conv"], pads=[1] * 4),
             *activation, *qdq(last, "y", out_scale, out_zero)]
    return optimized_ops(nodes, activation_params() | weight_inits | inits)


def test_conv_with_per_channel_axis0_weight_becomes_qlinearconv():
    ops = conv_then([], {})
    assert ops["QLinearConv"] == 1 and ops["Conv"] + ops["FusedConv"] == 0
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1   # the graph's own input and output


def test_relu_before_q_with_zero_point_at_type_min_is_removed():
    relu = [helper.make_node("Relu", ["conv"], ["relu"])]
    assert conv_then(relu, {})["QLinearConv"] == 1
    # zero point 128: the Q range has negatives, so Relu is real work and the conv stays float (FusedConv)
    ops = conv_then(relu, {"mid_scale": np.float32(STEP), "mid_zero": np.uint8(128)}, "mid_scale", "mid_zero")
    assert ops["QLinearConv"] == 0 and ops["FusedConv"] == 1


@pytest.mark.parametrize("q_max, absorbed", [(6.0, True), (255 * STEP, False)])
def test_clip_0_6_is_removed_only_when_the_q_range_lies_inside_it(q_max, absorbed):
    clip = [helper.make_node("Clip", ["conv", "low", "high"], ["clip"])]
    inits = {"low": np.float32(0), "high": np.float32(6), "out_scale": np.float32(q_max / 255),
             "out_zero": np.uint8(0)}
    ops = conv_then(clip, inits, "out_scale", "out_zero")
    assert (ops["QLinearConv"], ops["FusedConv"]) == ((1, 0) if absorbed else (0, 1))


@pytest.mark.parametrize("op, kernel", [("Add", "QLinearAdd"), ("Mul", "QLinearMul")])
def test_binary_op_with_both_inputs_dq_and_output_q_becomes_qlinear(op, kernel):
    nodes = [*qdq("x", "xd"), *qdq("x2", "x2d"), helper.make_node(op, ["xd", "x2d"], ["sum"]), *qdq("sum", "y")]
    ops = optimized_ops(nodes, activation_params(), {"x": [1, 4, 8, 8], "x2": [1, 4, 8, 8]})
    assert ops[kernel] == 1 and ops[op] == 0


MOVERS = {
    "MaxPool": ({"kernel_shape": [2, 2]}, []),
    "Transpose": ({"perm": [0, 2, 3, 1]}, []),
    "Reshape": ({}, ["shape"]),
}


@pytest.mark.parametrize("op", MOVERS)
@pytest.mark.parametrize("equal_params", [True, False])
def test_data_movement_between_equal_q_dq_runs_on_uint8(op, equal_params):
    attrs, extra_inputs = MOVERS[op]
    out = ("act_scale", "act_zero") if equal_params else ("other_scale", "other_zero")
    nodes = [*qdq("x", "xd"), helper.make_node(op, ["xd", *extra_inputs], ["moved"], **attrs), *qdq("moved", "y", *out)]
    inits = activation_params() | {"shape": np.array([1, -1], np.int64), "other_scale": np.float32(0.1),
                                   "other_zero": np.uint8(3)}
    ops = optimized_ops(nodes, inits, {"x": [1, 16, 8, 8]})
    # equal params: the DQ/Q pair around the op is dropped; different: it stays float between them
    assert ops["QuantizeLinear"] + ops["DequantizeLinear"] == (2 if equal_params else 4)


@pytest.mark.parametrize("shared", [True, False])
def test_a_dq_shared_by_two_convs_is_as_good_as_one_dq_each(shared):
    inits, nodes = dict(activation_params()), [helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zero"],
                                                                ["xq"])]
    for branch in ("a", "b"):
        weight_inits, weight_nodes = weight_dq(f"w{branch}", rng.standard_normal((8, 4, 3, 3)).astype(np.float32), 0)
        source = "xd" if shared else f"xd{branch}"
        if not shared or branch == "a":
            nodes.append(helper.make_node("DequantizeLinear", ["xq", "act_scale", "act_zero"], [source]))
        nodes += [*weight_nodes, helper.make_node("Conv", [source, f"w{branch}"], [f"c{branch}"], pads=[1] * 4),
                  *qdq(f"c{branch}", f"d{branch}")]
        inits |= weight_inits
    nodes.append(helper.make_node("Add", ["da", "db"], ["y"]))
    assert optimized_ops(nodes, inits)["QLinearConv"] == 2


def dense(op: str, output_q: bool, axis: int) -> collections.Counter:
    """x -> Q/DQ -> op with a [16, 32] int8 weight per-channel on ``axis`` -> (Q/DQ) -> y."""
    weight_inits, weight_nodes = weight_dq("w", rng.standard_normal((16, 32)).astype(np.float32), axis)
    out = "dense" if output_q else "y"
    nodes = [*qdq("x", "xd"), *weight_nodes, helper.make_node(op, ["xd", "w"], [out]),
             *(qdq("dense", "y") if output_q else [])]
    return optimized_ops(nodes, activation_params() | weight_inits, {"x": [2, 16]})


@pytest.mark.parametrize("output_q", [True, False])
def test_gemm_with_dq_weight_becomes_qgemm_with_or_without_output_q(output_q):
    ops = dense("Gemm", output_q, axis=1)
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0


@pytest.mark.parametrize("output_q, kernel", [(True, "QLinearMatMul"), (False, "MatMulIntegerToFloat")])
def test_matmul_with_per_column_int8_weight(output_q, kernel):
    ops = dense("MatMul", output_q, axis=1)
    assert ops[kernel] == 1 and ops["MatMul"] == 0


@pytest.mark.parametrize("output_q, kernel", [(True, "QLinearMatMul"), (False, "MatMulIntegerToFloat")])
def test_matmul_of_two_quantized_activations(output_q, kernel):
    """Attention's Q x K^T: no constant weight, and still an integer kernel with or without the output Q."""
    nodes = [*qdq("x", "xd"), *qdq("z", "zd"), helper.make_node("MatMul", ["xd", "zd"], ["mm" if output_q else "y"]),
             *(qdq("mm", "y") if output_q else [])]
    ops = optimized_ops(nodes, activation_params(), {"x": [2, 4, 16], "z": [2, 16, 4]})
    assert ops[kernel] == 1 and ops["MatMul"] == 0


@pytest.mark.parametrize("axis", [0, 1, None])
def test_conv_transpose_stays_float(axis):
    weight_inits, weight_nodes = weight_dq("w", rng.standard_normal((4, 8, 3, 3)).astype(np.float32), axis)
    nodes = [*qdq("x", "xd"), *weight_nodes, helper.make_node("ConvTranspose", ["xd", "w"], ["up"]), *qdq("up", "y")]
    ops = optimized_ops(nodes, activation_params() | weight_inits)
    assert ops["ConvTranspose"] == 1 and not set(ops) & {"QLinearConvTranspose", "QLinearConv", "ConvInteger"}


@pytest.mark.parametrize("op", ["HardSwish", "HardSigmoid"])
def test_hard_activations_stay_float_between_dq_and_q(op):
    nodes = [*qdq("x", "xd"), helper.make_node(op, ["xd"], ["act"]), *qdq("act", "y")]
    model = make_model(nodes, {"x": [1, 4, 8, 8]}, ["y"], activation_params(), opset=14)
    coverage = kernel_coverage(model)
    assert coverage.quantize_nodes == 2 and coverage.dequantize_nodes == 2
    assert set(coverage.float_islands) <= {"HardSigmoid", "Mul", "HardSwish"} and "HardSigmoid" in coverage.float_islands


def test_quantized_mobile_net_runs_every_inner_conv_as_qlinearconv():
    calibration = structured_images(16, seed=3)
    model = export_torch(MobileBlocksNet(), calibration[:1])
    quantized = onnxrepq.quantize(model, calibration, QuantConfig(fast=True))
    convs = [node for node in quantized.graph.node if node.op_type == "Conv"]
    outputs = {o.name for o in quantized.graph.output}
    last = [node for node in convs if node.output[0] in outputs]
    coverage = kernel_coverage(quantized)
    # 8 convs after fusion (the residual block's conv is fused with the identity) and the HardSwish gate
    # as a depthwise 1x1 conv (passes/hard_gates.py); the SE gate folds into the conv before it.
    assert len(last) == 1 and len(convs) == 10
    assert coverage.integer_kernels == {"QLinearConv": len(convs) - 1}
    assert coverage.float_compute == {"Conv": 1}     # the conv writing the graph output has no Q after it
    assert coverage.float_islands == {}
    assert coverage.coverage == pytest.approx(9 / 10)
