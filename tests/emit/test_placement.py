"""Q/DQ placement (emit/placement.py): a tensor is rounded only where an integer kernel reads it.

A recognizer's head, MatMul -> Add(bias) -> Flatten -> Softmax, is the case that made the rule:
its logits were rounded twice to the activation grid, which no kernel needed (onnxruntime runs the
MatMul as MatMulIntegerToFloat without an output Q), and at 6-bit activations the rounded logits
cost PP-OCRv4 rec 8 points of exact match.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrepq
from onnxrepq.config import QuantConfig
from onnxrepq.emit.coverage import optimized_model
from tests.models_for_tests import make_model, run_ort, sqnr_db, weights

rng = np.random.default_rng(3)
FEATURES, HIDDEN, CLASSES = 16, 24, 12
CALIBRATION = rng.standard_normal((32, 4, FEATURES)).astype(np.float32)
HELD_OUT = rng.standard_normal((16, 4, FEATURES)).astype(np.float32)


def own(*shape) -> np.random.Generator:
    """This test's own draw per weight shape (the SQNR floors were measured on it)."""
    return np.random.default_rng([0, *shape])


def head_model(hidden_consumer: str) -> onnx.ModelProto:
    """x -> MatMul -> Add(bias) -> [Relu] -> Reshape -> MatMul -> Add(bias) -> Flatten -> Softmax -> y.

    The first MatMul's result reaches the second through a bias Add and a Reshape (data movement):
    an integer op reads it, so it stays quantized. The second is the head: its result reaches only
    the Softmax. ``hidden_consumer`` "Relu" puts an absorbed activation after the first Add.
    """
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"])]
    hidden = "hb"
    if hidden_consumer == "Relu":
        nodes.append(helper.make_node("Relu", ["hb"], ["hr"]))
        hidden = "hr"
    nodes += [
        helper.make_node("Reshape", [hidden, "shape"], ["hs"]),
        helper.make_node("MatMul", ["hs", "w2"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "b2"], ["logits"]),
        helper.make_node("Flatten", ["logits"], ["flat"], axis=1),
        helper.make_node("Softmax", ["flat"], ["y"], axis=1),
    ]
    inits = {"w1": weights(FEATURES, HIDDEN, generator=own(FEATURES, HIDDEN)),
             "b1": weights(HIDDEN, generator=own(HIDDEN)), "shape": np.array([0, 4, HIDDEN], np.int64),
             "w2": weights(HIDDEN, CLASSES, generator=own(HIDDEN, CLASSES)),
             "b2": weights(CLASSES, scale=2.0, generator=own(CLASSES))}
    return make_model(nodes, {"x": ["n", 4, FEATURES]}, ["y"], inits)


def quantized_tensors(model: onnx.ModelProto) -> set[str]:
    return {node.input[0] for node in model.graph.node if node.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("hidden_consumer", ["Add", "Relu"])
@pytest.mark.parametrize("activation_bits", [8, 6])
def test_the_logits_stay_float_and_the_head_stays_integer(hidden_consumer, activation_bits):
    model = head_model(hidden_consumer)
    config = QuantConfig(fast=True, activation_bits=activation_bits, weight_bits=activation_bits)
    result = onnxrepq.quantize(model, CALIBRATION, config)

    rounded = quantized_tensors(result)
    # the first MatMul's result reaches the second through the bias Add and the Reshape: quantized
    # (behind a Relu, which has no int8 kernel here, the Reshape's output is); the head's reaches only Softmax
    assert {"x", "hs"} <= rounded and ({"h", "hb"} <= rounded) == (hidden_consumer == "Add")
    assert not rounded & {"logits_raw", "logits", "flat"}
    ops = collections.Counter(node.op_type for node in optimized_model(result).graph.node)
    assert ops["MatMul"] == 0 and ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 2
    assert ops["MatMulIntegerToFloat"] >= 1     # the head, with its float output

    reference = run_ort(model, {"x": HELD_OUT})[0]
    # measured: 32.7 / 30.0 dB at 8 bits (Add / Relu), 18.9 / 19.9 at 6
    assert sqnr_db(reference, run_ort(result, {"x": HELD_OUT})[0]) >= (27.0 if activation_bits == 8 else 16.0)


def test_a_conv_output_that_reaches_only_float_ops_is_still_quantized():
    """QLinearConv exists only with the Q after the conv, so a conv keeps it even when nothing integer reads it."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"], axis=1), helper.make_node("Softmax", ["f"], ["y"], axis=1)]
    model = make_model(nodes, {"x": ["n", 3, 6, 6]}, ["y"], {"w": weights(4, 3, 3, 3, generator=own(4, 3, 3, 3)),
                                                           "b": weights(4, generator=own(4))})
    images = np.random.default_rng(4).standard_normal((16, 3, 6, 6)).astype(np.float32)
    result = onnxrepq.quantize(model, images, QuantConfig(fast=True))
    assert "c" in quantized_tensors(result)
    ops = collections.Counter(node.op_type for node in optimized_model(result).graph.node)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 0
