"""Constant operands of quantized Add/Mul (emit/constant_operands.py): exact uint8 DQs that let
onnxruntime CPU fuse QLinearMul/QLinearAdd, with no loss against leaving the constant float."""
from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxrepq
from onnxrepq.config import QuantConfig
from onnxrepq.emit.constant_operands import exact_encoding, offset_encoding
from onnxrepq.emit.coverage import optimized_model
from onnxrepq.emit.targets import ORT_CPU, TARGETS
from tests.models_for_tests import make_model, run_ort, sqnr_db, structured_images, weights

CHANNELS = 8


def affine_model(scale, shift) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Mul(scale) -> Add(shift) -> Conv -> y: PP-LCNet's learnable affine between convs."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Mul", ["s", "r"], ["m"]),
             helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("Conv", ["a", "w2", "b2"], ["y"], pads=[1] * 4)]
    inits = {"w1": weights(CHANNELS, 3, 3, 3), "b1": weights(CHANNELS), "w2": weights(CHANNELS, CHANNELS, 3, 3),
             "b2": weights(CHANNELS), "s": np.asarray(scale, np.float32), "t": np.asarray(shift, np.float32)}
    return make_model(nodes, {"x": ["n", 3, 16, 16]}, {"y": ["n", CHANNELS, 16, 16]}, inits)


def quantize(model: onnx.ModelProto, monkeypatch=None) -> onnx.ModelProto:
    config = QuantConfig(fast=True)
    if monkeypatch is not None:   # the same run without the pass: the float-constant baseline
        monkeypatch.setitem(TARGETS, "ort-cpu", replace(ORT_CPU, quantize_constant_operands=False))
    return onnxrepq.quantize(model, structured_images(8, seed=1), config)


CASES = {
    "scalars": ([0.75], [-0.5]),
    "negative_scale": ([-1.25], [0.3]),
    "rank0_scale": (np.float32(0.6), [0.25]),   # an Add of 0 is removed by normalization; see the encoding test
    "all_equal_channels": (np.full((1, CHANNELS, 1, 1), 0.8), np.full((1, CHANNELS, 1, 1), -0.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_affine_fuses_exactly_without_loss(case, monkeypatch):
    scale, shift = CASES[case]
    model = affine_model(scale, shift)
    quantized = quantize(model)
    onnx.checker.check_model(quantized, full_check=True)

    ops = collections.Counter(n.op_type for n in optimized_model(quantized).graph.node)
    assert ops["QLinearMul"] == 1 and ops["QLinearAdd"] == 1, ops
    assert ops["Mul"] == 0 and ops["Add"] == 0, ops

    # Each constant decodes bit for bit to the float it replaced.
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    decoded = {}
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized") and "_constant" in node.input[0]:
            q, s, zp = (inits[name] for name in node.input)
            decoded[node.name] = ((q.astype(np.int32) - zp.astype(np.int32)) * s).astype(np.float32)
    assert len(decoded) == 2
    expected = sorted(np.asarray(v, np.float32).tobytes() for v in (scale, shift))
    assert sorted(v.tobytes() for v in decoded.values()) == expected

    feeds = {"x": structured_images(4, seed=7)}
    reference = run_ort(model, feeds)[0]
    with_pass = sqnr_db(reference, run_ort(quantized, feeds)[0])
    without = sqnr_db(reference, run_ort(quantize(model, monkeypatch), feeds)[0])
    assert with_pass >= without - 0.1, (with_pass, without)


def test_per_channel_offset_fuses_within_half_a_step(monkeypatch):
    """A per-channel added constant (what equalization makes of a scalar offset) goes on a uint8 grid:
    QLinearAdd instead of a float Add, each value within half a step, and no worse than float."""
    shift = np.linspace(-2.0, -0.05, CHANNELS).reshape(1, CHANNELS, 1, 1)
    model = affine_model([0.75], shift)
    quantized = quantize(model)
    ops = collections.Counter(n.op_type for n in optimized_model(quantized).graph.node)
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0, ops
    feeds = {"x": structured_images(4, seed=7)}
    reference = run_ort(model, feeds)[0]
    with_pass = sqnr_db(reference, run_ort(quantized, feeds)[0])
    without = sqnr_db(reference, run_ort(quantize(model, monkeypatch), feeds)[0])
    # at 35 dB the half-step offsets show (0.2 to 0.5 dB here); PP-OCRv4 rec gained 0.4 dB from the fused Adds
    assert with_pass >= without - 1.0, (with_pass, without)


@pytest.mark.parametrize("values", [[-2.0, -0.05, -1.3], [0.2, 3.0, 1.7], [-1.0, 2.5, 0.0]])
def test_offset_encoding_is_within_half_a_step(values):
    values = np.array(values, np.float32).reshape(1, 3, 1, 1)
    for dtype in (np.uint8, np.int8):
        q, scale, zero_point = offset_encoding(values, dtype)
        assert q.shape == values.shape and q.dtype == zero_point.dtype == dtype
        decoded = (q.astype(np.int32) - zero_point.astype(np.int32)) * scale
        span = max(values.max(), 0) - min(values.min(), 0)
        assert np.isclose(scale, span / 255)
        assert np.max(np.abs(decoded - values)) <= scale / 2 + 1e-7


def test_per_channel_constant_is_left_float():
    """A non-uniform constant is not exact on a per-tensor grid: the Mul stays float, as before."""
    model = affine_model(np.linspace(0.5, 1.5, CHANNELS).reshape(1, CHANNELS, 1, 1), [0.1])
    quantized = quantize(model)
    ops = collections.Counter(n.op_type for n in optimized_model(quantized).graph.node)
    assert ops["QLinearAdd"] == 1 and ops["Mul"] == 1, ops


def test_tensorrt_keeps_float_constants():
    model = affine_model([0.75], [-0.5])
    quantized = onnxrepq.quantize(model, structured_images(8, seed=1), QuantConfig(fast=True, target="tensorrt"))
    inits = {i.name for i in quantized.graph.initializer}
    assert {"s", "t"} <= inits
    assert not any("_constant" in name for name in inits)


@pytest.mark.parametrize("value", [0.63296586, -0.54658866, 0.0, 1e-30, -3.4e38])
def test_scalar_encoding_is_exact(value):
    for dtype in (np.uint8, np.int8):
        q, scale, zero_point = exact_encoding(np.array([value], np.float32), dtype)
        assert q.dtype == zero_point.dtype == dtype and scale.dtype == np.float32
        decoded = ((q.astype(np.int32) - zero_point.astype(np.int32)) * scale).astype(np.float32)
        assert decoded.tobytes() == np.array([value], np.float32).tobytes()
    assert exact_encoding(np.array([1.0, 2.0], np.float32), np.uint8) is None


def test_block_reconstruction_runs_over_constant_dequantize():
    """Reconstruction runs after this pass: the torch executor reads the uint8 constant's DQ like a weight's,
    and the constants come out unchanged (they are not learned)."""
    from onnxrepq.config import ReconstructionConfig

    model = affine_model([-1.25], [0.3])
    config = QuantConfig(reconstruction=ReconstructionConfig(iterations=5, batch_size=4))
    quantized = onnxrepq.quantize(model, structured_images(8, seed=1), config)
    ops = collections.Counter(n.op_type for n in optimized_model(quantized).graph.node)
    assert ops["QLinearMul"] == 1 and ops["QLinearAdd"] == 1 and ops["Mul"] == ops["Add"] == 0, ops
    feeds = {"x": structured_images(4, seed=7)}
    assert sqnr_db(run_ort(model, feeds)[0], run_ort(quantized, feeds)[0]) > 20


def test_a_bias_after_a_matmul_stays_float():
    """MatMul -> Add(vector): a layer's bias, which bias correction moves; it is not rounded to a grid."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    inits = {"w1": weights(8, 8), "b": np.linspace(-1.0, 1.0, 8).astype(np.float32), "w2": weights(8, 8)}
    model = make_model(nodes, {"x": ["n", 4, 8]}, {"y": ["n", 4, 8]}, inits)
    calibration = np.random.default_rng(3).standard_normal((8, 4, 8)).astype(np.float32)
    quantized = onnxrepq.quantize(model, calibration, QuantConfig(fast=True))
    add = next(n for n in quantized.graph.node if n.op_type == "Add")
    assert not any("_constant" in name for name in add.input), list(add.input)
