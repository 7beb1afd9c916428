"""HardSigmoid/HardSwish as a depthwise 1x1 conv and a clip (passes/hard_gates.py): exact in float,
and after quantization for onnxruntime CPU no float island is left where they were."""
from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
from onnx import helper

import onnxrepq
from onnxrepq.config import QuantConfig
from onnxrepq.emit.coverage import kernel_coverage
from onnxrepq.emit.targets import ORT_CPU, TARGETS
from onnxrepq.passes.hard_gates import HardGatesAsConv
from tests.models_for_tests import (apply_passes, assert_same_outputs, make_model, op_types, run_ort, sqnr_db,
                                    structured_images, weights)

C = 8


def gated_model(opset: int = 14) -> "onnx.ModelProto":
    """conv -> HardSwish (a HardSwish op) -> SE (GAP -> conv -> Relu -> conv -> HardSigmoid -> Mul)
    -> Add -> HardSigmoid(alpha 0.25, beta 0.4) on a non-conv tensor -> conv."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("HardSwish", ["c1"], ["h"]),
             helper.make_node("GlobalAveragePool", ["h"], ["p"]),
             helper.make_node("Conv", ["p", "w2", "b2"], ["s1"]),
             helper.make_node("Relu", ["s1"], ["s2"]),
             helper.make_node("Conv", ["s2", "w3"], ["s3"]),        # no bias: the fold must add one
             helper.make_node("HardSigmoid", ["s3"], ["g"]),
             helper.make_node("Mul", ["h", "g"], ["se"]),
             helper.make_node("Add", ["se", "c1"], ["a"]),
             helper.make_node("HardSigmoid", ["a"], ["k"], alpha=0.25, beta=0.4),
             helper.make_node("Mul", ["a", "k"], ["m"]),
             helper.make_node("Conv", ["m", "w4", "b4"], ["y"], pads=[1] * 4)]
    inits = {"w1": weights(C, 3, 3, 3), "b1": weights(C), "w2": weights(C // 2, C, 1, 1), "b2": weights(C // 2),
             "w3": weights(C, C // 2, 1, 1), "w4": weights(4, C, 3, 3), "b4": weights(4)}
    return make_model(nodes, {"x": ["n", 3, 16, 16]}, {"y": ["n", 4, 16, 16]}, inits, opset=opset)


def test_rewrite_is_exact_in_float():
    model = gated_model()
    rewritten, (record,) = apply_passes(model, [HardGatesAsConv()])
    ops = collections.Counter(op_types(rewritten))
    assert ops["HardSigmoid"] == 0 and ops["HardSwish"] == 0
    # the SE gate folds into w3's conv; the HardSwish and the second HardSigmoid get a gate conv each
    assert ops["Conv"] == 4 + 2 and ops["Clip"] == 3
    assert record.notes[:2] == ["1 HardSigmoid folded into the conv before them (now Clip(0, 1))",
                                "2 HardSigmoid/HardSwish as a depthwise 1x1 conv and Clip(0, 1)"]
    feeds = {"x": structured_images(4, seed=2) * 4}   # wide enough that every gate saturates somewhere
    assert_same_outputs(model, rewritten, feeds, rtol=1e-5)


def test_gates_it_cannot_write_as_a_conv_are_left_alone():
    """A rank-2 HardSigmoid (Conv needs 4-d here) and one on the graph output keep their op."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["f"]), helper.make_node("HardSigmoid", ["f"], ["g"]),
             helper.make_node("Mul", ["f", "g"], ["m"]), helper.make_node("HardSigmoid", ["m"], ["y"])]
    model = make_model(nodes, {"x": ["n", 6]}, {"y": ["n", 5]}, {"w": weights(6, 5)})
    rewritten, (record,) = apply_passes(model, [HardGatesAsConv()])
    assert op_types(rewritten) == op_types(model) and not record.modified
    assert set(record.notes) == {"1 left as they are: not 4-d with a known channel count",
                                 "1 left as they are: on a graph output or not float"}


def quantize(model, rules=ORT_CPU, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setitem(TARGETS, rules.name, rules)
    return onnxrepq.quantize(model, structured_images(16, seed=1) * 4,
                             QuantConfig(fast=True, target=rules.name))


def test_no_float_island_is_left_and_accuracy_holds(monkeypatch):
    model = gated_model()
    feeds = {"x": structured_images(8, seed=5) * 4}
    reference = run_ort(model, feeds)[0]
    quantized = quantize(model)
    coverage = kernel_coverage(quantized)
    assert coverage.float_islands == {}
    assert coverage.integer_kernels["QLinearConv"] == 5   # all but the conv writing the graph output
    with_pass = sqnr_db(reference, run_ort(quantized, feeds)[0])

    islands = quantize(model, replace(ORT_CPU, hard_gates_as_conv=False), monkeypatch)
    assert set(kernel_coverage(islands).float_islands) >= {"HardSigmoid"}
    without = sqnr_db(reference, run_ort(islands, feeds)[0])
    # measured 29.7 dB with the pass, 29.7 without: the same numbers, minus the islands
    assert with_pass >= without - 0.5 and with_pass > 25.0, (with_pass, without)


def test_tensorrt_keeps_its_hard_gates():
    ops = collections.Counter(op_types(quantize(gated_model(), TARGETS["tensorrt"])))
    assert ops["HardSwish"] == 1 and ops["HardSigmoid"] == 2


def test_fuse_keeps_the_float_deploy_form():
    """``fuse`` is the float model: no gate convs added there."""
    ops = collections.Counter(op_types(onnxrepq.fuse(gated_model())))
    assert ops["Conv"] == 4 and ops["HardSigmoid"] + ops["HardSwish"] == 3
