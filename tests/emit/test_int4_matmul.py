"""True int4 weights for weight-only MatMul/Gemm on onnxruntime CPU (emit/int4_matmul.py).

The claim has three halves, each checked here: the written model is valid ONNX at opset 21 with
int4 initializers; onnxruntime's optimizer turns each such layer into MatMulNBits (read from the
graph it runs); and the model computes exactly the float model with the int4 weights decoded in
numpy. Conv at 4 bits and the tensorrt target keep the int8 container.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxrepq
from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig
from onnxrepq.emit.coverage import optimized_model
from onnxrepq.emit.int4_matmul import block_size_for, block_weight_scales
from onnxrepq.search.quant_grid import weight_grid
from tests.models_for_tests import make_model, weights

K_GEMM, N_GEMM, N_MATMUL = 8 * 8 * 8, 96, 48


def conv_gemm_matmul_model() -> onnx.ModelProto:
    """Conv -> Relu -> Flatten -> Gemm(transB=1, bias) -> Tanh -> MatMul -> Add(bias)."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["g"], transB=1),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("MatMul", ["t", "mm_w"], ["m"]),
        helper.make_node("Add", ["m", "mm_b"], ["y"]),
    ]
    return make_model(nodes, {"x": [None, 3, 8, 8]}, {"y": [None, N_MATMUL]}, {
        "conv_w": weights(8, 3, 3, 3), "conv_b": weights(8, scale=0.1),
        "gemm_w": weights(N_GEMM, K_GEMM, scale=0.05), "gemm_b": weights(N_GEMM, scale=0.1),
        "mm_w": weights(N_GEMM, N_MATMUL, scale=0.2), "mm_b": weights(N_MATMUL, scale=0.1)})


def sequence_matmul_model(k: int = 120) -> onnx.ModelProto:
    """A transformer-style [batch, sequence, K] MatMul + bias, K = 120 as in PP-OCRv4 rec's neck."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return make_model(nodes, {"x": [None, 5, k]}, {"y": [None, 5, 72]},
                      {"w": weights(k, 72, scale=0.1), "b": weights(72, scale=0.1)})


def _images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def quantized():
    model = conv_gemm_matmul_model()
    result = quantize_with_result(model, [{"x": _images(2, seed)} for seed in range(4)],
                                  QuantConfig(weight_bits=4, activation_bits=8, fast=True))
    return model, result


def _int4_layers(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """DQ output -> (int4 values as int8, block scales, block size), for every int4 DequantizeLinear."""
    constants = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        weight = constants.get(node.input[0])
        if node.op_type == "DequantizeLinear" and weight is not None and weight.data_type == onnx.TensorProto.INT4:
            block = next(a.i for a in node.attribute if a.name == "block_size")
            found[node.output[0]] = (numpy_helper.to_array(weight).astype(np.int8),
                                     numpy_helper.to_array(constants[node.input[1]]), block)
    return found


def _decoded_float_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The quantized model with every int4 DQ replaced by its weight decoded in numpy (float initializer)."""
    decoded = onnx.ModelProto()
    decoded.CopyFrom(model)
    layers = _int4_layers(model)
    kept = [n for n in decoded.graph.node if n.output[0] not in layers]
    del decoded.graph.node[:]
    decoded.graph.node.extend(kept)
    for name, (values, scale, block) in layers.items():
        weight = values.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0)[:len(values)]
        decoded.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
    return decoded


def _run(model: onnx.ModelProto, feeds: dict, fp32_kernel: bool = False, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if fp32_kernel:   # MatMulNBits' default accuracy level 4 quantizes its input to int8 per block
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_gemm_and_matmul_become_int4_and_fuse_into_matmulnbits(quantized):
    _, result = quantized
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 21
    layers = _int4_layers(model)
    assert sorted(v.shape for v, _, _ in layers.values()) == [(N_GEMM, N_MATMUL), (K_GEMM, N_GEMM)]  # B as [K, N]
    assert all(block == 32 and len(scale) == len(values) // 32 for values, scale, block in layers.values())
    ops = [node.op_type for node in optimized_model(model).graph.node]
    assert ops.count("MatMulNBits") == 2
    assert "Gemm" not in ops and "MatMul" not in ops and "QGemm" not in ops


def test_int4_layers_compute_the_decoded_float_model(quantized):
    _, result = quantized
    feeds = {"x": _images(3, seed=11)}
    decoded = _decoded_float_model(result.model)
    expected = _run(decoded, feeds)
    assert np.abs(_run(result.model, feeds, fp32_kernel=True) - expected).max() <= 1e-5 * np.abs(expected).max()
    # at the default accuracy level onnxruntime quantizes the MatMulNBits input to int8 per block
    default = _run(result.model, feeds)
    assert 0 < np.abs(default - expected).max() <= 0.02 * np.abs(expected).max()


def test_int4_values_sit_on_the_symmetric_grid_with_searched_block_scales(quantized):
    float_model, result = quantized
    layers = _int4_layers(result.model)
    for values, scale, _ in layers.values():
        assert values.min() >= -7 and values.max() <= 7 and (values == 7).any() | (values == -7).any()
    # MSE search clips: some block scale sits below that block's absmax / 7
    gemm_w = numpy_helper.to_array(next(t for t in float_model.graph.initializer if t.name == "gemm_w")).T
    values, scale, block = next(v for v in layers.values() if v[0].shape == gemm_w.shape)
    absmax = np.abs(gemm_w).reshape(-1, block, gemm_w.shape[1]).max(axis=1)
    assert (scale < absmax / 7 * 0.999).any() and (scale <= absmax / 7 * 1.0001).all()
    np.testing.assert_array_equal(scale, block_weight_scales(gemm_w, block, "mse", weight_grid(4)))


def test_inputs_of_int4_layers_stay_float_and_conv_keeps_the_int8_container(quantized):
    _, result = quantized
    model = result.model
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul"):
            assert producers[node.input[0]].op_type != "DequantizeLinear", node.name
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv_weight = producers[conv.input[1]]
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv_weight.input[0]))
    assert weight.dtype == np.int8 and np.abs(weight).max() <= 7
    assert producers[conv.input[0]].op_type == "DequantizeLinear"
    rows = {row["op"]: row for row in result.layers}
    label = "int4 weight-only, block 32 (MatMulNBits)"
    assert rows["Gemm"]["weight_storage"] == rows["MatMul"]["weight_storage"] == label
    assert rows["Conv"]["weight_storage"] == "int8 [-7, 7]"
    assert "input_scale" not in rows["Gemm"] and "input_scale" in rows["Conv"]


def test_short_last_block_is_exact_and_fused():
    model = sequence_matmul_model(k=120)
    data = [{"x": np.random.default_rng(s).standard_normal((2, 5, 120)).astype(np.float32)} for s in range(3)]
    quantized = onnxrepq.quantize(model, data, QuantConfig(weight_bits=4, fast=True))
    (values, scale, block), = _int4_layers(quantized).values()
    assert block == block_size_for(120) == 32 and scale.shape == (4, 72)
    assert [n.op_type for n in optimized_model(quantized).graph.node].count("MatMulNBits") == 1
    feeds = {"x": np.random.default_rng(9).standard_normal((2, 5, 120)).astype(np.float32)}
    expected = _run(_decoded_float_model(quantized), feeds)
    for optimize in (False, True):
        actual = _run(quantized, feeds, fp32_kernel=True, optimize=optimize)
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max()


def test_eight_bits_and_tensorrt_keep_int8_containers_at_the_original_opset():
    model = conv_gemm_matmul_model()
    data = [{"x": _images(2, seed)} for seed in range(2)]
    for config in (QuantConfig(weight_bits=8, fast=True), QuantConfig(weight_bits=4, target="tensorrt", fast=True)):
        quantized = onnxrepq.quantize(model, data, config)
        assert not _int4_layers(quantized)
        assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == 13
        weights_int8 = [t for t in quantized.graph.initializer
                        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
        assert len(weights_int8) == 3, config


def _matmul_into_conv(between: str) -> onnx.ModelProto:
    """x [1, 4, 4, 64] -> MatMul [64, 4] -> (``between``) -> 1x1 Conv: the Conv asks for its input quantized."""
    layer = {"Reshape": [helper.make_node("Reshape", ["m", "shape"], ["b"])],
             "Tanh": [helper.make_node("Tanh", ["m"], ["b"])], "": []}[between]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), *layer,
             helper.make_node("Conv", ["b" if layer else "m", "conv_w"], ["y"])]
    return make_model(nodes, {"x": [1, 4, 4, 64]}, {"y": [1, 4, 4, 4]},
                      {"w": weights(64, 4, scale=0.2), "shape": np.array([1, 4, 4, 4], np.int64),
                       "conv_w": weights(4, 4, 1, 1)})


@pytest.mark.parametrize("between", ["", "Reshape"])
def test_a_quantize_after_the_matmul_keeps_the_int8_container(between):
    """onnxruntime fuses no MatMulNBits before a QuantizeLinear (it moves one up through a Reshape first)."""
    data = [{"x": np.random.default_rng(s).standard_normal((1, 4, 4, 64)).astype(np.float32)} for s in range(2)]
    result = quantize_with_result(_matmul_into_conv(between), data, QuantConfig(weight_bits=4, fast=True))
    assert not _int4_layers(result.model)
    assert any("output is quantized" in note
               for record in result.passes if record.name == "int4_weight_only" for note in record.notes)
    assert "QLinearMatMul" in [n.op_type for n in optimized_model(result.model).graph.node]


def test_a_float_op_between_the_matmul_and_a_quantized_conv_lets_it_fuse():
    data = [{"x": np.random.default_rng(s).standard_normal((1, 4, 4, 64)).astype(np.float32)} for s in range(2)]
    quantized = onnxrepq.quantize(_matmul_into_conv("Tanh"), data, QuantConfig(weight_bits=4, fast=True))
    assert len(_int4_layers(quantized)) == 1
    ops = [n.op_type for n in optimized_model(quantized).graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("QuantizeLinear") == 1   # the Conv's input


def test_an_input_dequantized_through_a_reshape_keeps_the_int8_container():
    """onnxruntime moves a DQ down through Reshape onto the MatMul's A (PP-OCRv4 rec's head has this)."""
    nodes = [helper.make_node("Conv", ["x", "conv_w"], ["c"]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    model = make_model(nodes, {"x": [1, 4, 4, 4]}, {"y": [1, 1, 32]},
                       {"conv_w": weights(4, 4, 1, 1), "shape": np.array([1, 1, 64], np.int64),
                        "w": weights(64, 32, scale=0.2)})
    data = [{"x": np.random.default_rng(s).standard_normal((1, 4, 4, 4)).astype(np.float32)} for s in range(2)]
    result = quantize_with_result(model, data, QuantConfig(weight_bits=4, fast=True))
    assert not _int4_layers(result.model)
    assert any("through Reshape/Transpose from a quantized tensor" in note
               for record in result.passes if record.name == "int4_weight_only" for note in record.notes)
    ops = [n.op_type for n in optimized_model(result.model).graph.node]
    assert "MatMul" not in ops and "MatMulNBits" not in ops


def test_a_mixed_precision_choice_of_four_bits_takes_the_int4_form():
    from onnxrepq.search.mixed_precision import MixedPrecisionConfig
    config = QuantConfig(fast=True, mixed_precision=MixedPrecisionConfig(budget_mean_bits=4.0, candidates=(4,),
                                                                         samples=2))
    result = quantize_with_result(conv_gemm_matmul_model(), [{"x": _images(2, seed)} for seed in range(2)], config)
    assert len(_int4_layers(result.model)) == 2
    assert [n.op_type for n in optimized_model(result.model).graph.node].count("MatMulNBits") == 2


def test_reconstruction_keeps_the_int8_container():
    """fast=False learns per-channel weights behind a quantized input: that layer is emitted as learned."""
    from onnxrepq.config import ReconstructionConfig
    config = QuantConfig(weight_bits=4, fast=False, reconstruction=ReconstructionConfig(iterations=1, batch_size=1))
    quantized = onnxrepq.quantize(conv_gemm_matmul_model(), [{"x": _images(1, seed=0)}], config)
    assert not _int4_layers(quantized)
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == 13
