"""QuantizeBias (emit/finalize.py) on a conv with a pruned (all-zero) output channel, whose weight step
says nothing: the int32 bias must give the float graph's numbers, not saturate."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxrepq.emit.finalize import QuantizeBias
from onnxrepq.search.criteria import weight_scales
from onnxrepq.search.quant_grid import weight_grid
from tests.models_for_tests import apply_passes, make_model, run_ort

rng = np.random.default_rng(7)
X = rng.uniform(-1, 1, (2, 4, 6, 6)).astype(np.float32)


def conv_with_bias(integers: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray, offset: int = 0):
    """x -> Q/DQ -> Conv(DQ(int8 weight, per-channel), float bias) -> y; ``offset`` 128: uint8 weights."""
    dtype = np.uint8 if offset else np.int8
    inits = {"xs": np.float32(1 / 128), "xz": np.int8(0), "w": (integers + offset).astype(dtype),
             "ws": weight_scale.astype(np.float32), "wz": np.full(len(weight_scale), offset, dtype),
             "b": bias.astype(np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[1] * 4)]
    return make_model(nodes, {"x": [None, 4, 6, 6]}, ["y"], inits)


def _integers(dead: list[int]) -> np.ndarray:
    integers = rng.integers(-100, 101, (4, 4, 3, 3))
    integers[dead] = 0
    return integers


def test_pruned_channel_bias_is_exact_not_saturated():
    scales = np.array([0.01, 4.7e-11, 0.02, 0.015])     # channel 1 pruned: the old vanishing step
    bias = np.array([0.3, 2.5, -0.7, 0.1])               # 2.5 / (1/128 * 4.7e-11) is far past int32
    model = conv_with_bias(_integers([1]), scales, bias)
    quantized, records = apply_passes(model, [QuantizeBias()])
    before, after = run_ort(model, {"x": X}, optimize=False)[0], run_ort(quantized, {"x": X}, optimize=False)[0]
    # the bias is rounded to half an input x weight step (1/128 x 0.02 / 2 = 8e-5 here)
    np.testing.assert_allclose(after, before, atol=8e-5)
    np.testing.assert_allclose(after[:, 1], 2.5, atol=1e-6)   # the pruned channel outputs its bias alone
    assert records[0].notes == ["1 biases stored as int32"]
    stored = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    assert [v.dtype for n, v in stored.items() if n.endswith("_bias_quantized")] == [np.int32]
    # the other channels keep their weight steps; and onnxruntime's int8 kernels agree
    widened = next(v for n, v in stored.items() if n.endswith("_scale_widened"))
    np.testing.assert_array_equal(widened[[0, 2, 3]], scales[[0, 2, 3]].astype(np.float32))
    np.testing.assert_allclose(run_ort(quantized, {"x": X})[0], after, atol=1e-5)


@pytest.mark.parametrize("offset", [0, 128])   # 128: weights stored as uint8 (weight range "unsigned")
def test_nearly_pruned_channel_gets_a_step_that_holds_its_bias(offset):
    """Weights of 1e-8 (float residue of a pruned channel): the step is raised, the integers re-rounded on it."""
    scales = np.array([0.01, 1e-10, 0.02, 0.015])
    integers = _integers([])
    integers[1] = rng.integers(-100, 101, (4, 3, 3))
    model = conv_with_bias(integers, scales, np.array([0.3, 2.5, -0.7, 0.1]), offset)
    quantized, records = apply_passes(model, [QuantizeBias()])
    assert records[0].notes == ["1 biases stored as int32"]
    before, after = run_ort(model, {"x": X}, optimize=False)[0], run_ort(quantized, {"x": X}, optimize=False)[0]
    np.testing.assert_allclose(after, before, atol=8e-5)
    stored = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    widened = next(v for n, v in stored.items() if n.endswith("_integers_widened"))
    assert widened.dtype == (np.uint8 if offset else np.int8)
    widened = widened.astype(np.int64) - offset
    np.testing.assert_array_equal(widened[[0, 2, 3]], integers[[0, 2, 3]])
    assert np.abs(widened[1]).max() < np.abs(integers[1]).max()
    # the model given to the pass keeps its constants (a shared one is not changed under another node)
    given = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.int64)
    assert np.array_equal(given - offset, integers)


def test_bias_past_int32_on_a_per_tensor_weight_scale_stays_float():
    model = conv_with_bias(_integers([]), np.array([1e-10]), np.array([0.3, 2.5, -0.7, 0.1]))
    quantized, records = apply_passes(model, [QuantizeBias()])
    assert not records[0].modified and "1 biases kept float" in records[0].notes[0]
    np.testing.assert_array_equal(run_ort(quantized, {"x": X}, optimize=False)[0],
                                  run_ort(model, {"x": X}, optimize=False)[0])


@pytest.mark.parametrize("method", ["minmax", "mae", "mse"])
def test_pruned_channels_get_the_median_weight_step(method):
    weight = rng.normal(0, 1, (5, 3, 3, 3)) * np.array([1, 0, 2, 0, 4]).reshape(5, 1, 1, 1)
    scales = weight_scales(weight, 0, method, weight_grid(8))
    live = scales[[0, 2, 4]]
    np.testing.assert_array_equal(scales[[1, 3]], np.float32(np.median(live)))
    assert np.all(scales > 1e-4)
    assert np.all(weight_scales(np.zeros((3, 2)), 0, method, weight_grid(8)) == 1.0)
