"""Below 8 bits: narrow grids held in int8 containers, checked in onnxruntime.

The claim is that the emitted graph computes true b-bit arithmetic while onnxruntime still runs
its int8 kernels. Both halves are checked: every dequantized activation takes at most 2^b values
(read from the model onnxruntime runs), and the optimized graph has as many integer kernels as the
8-bit one.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxrepq
from onnxrepq.config import QuantConfig, ReconstructionConfig
from onnxrepq.emit.coverage import kernel_coverage
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, run_ort, sqnr_db, structured_images


@pytest.fixture(scope="module")
def float_model_and_data():
    calibration = structured_images(16, seed=7)
    return export_torch(MobileBlocksNet(), calibration[:1]), calibration


def _quantize(model, data, **config):
    return onnxrepq.quantize(model, data, QuantConfig(fast=config.pop("fast", True), **config))


def _dequantized_activations(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """Every activation DequantizeLinear output, made a graph output and run in onnxruntime."""
    constants = {t.name for t in model.graph.initializer}
    names = [node.output[0] for node in model.graph.node
             if node.op_type == "DequantizeLinear" and node.input[0] not in constants]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, feeds)))


def _activation_levels(model, data) -> int:
    values = _dequantized_activations(model, {_input_name(model): data[:4]})
    return max(len(np.unique(v)) for v in values.values())


def _input_name(model: onnx.ModelProto) -> str:
    return model.graph.input[0].name


@pytest.mark.parametrize("bits", [6, 4])
def test_ort_cpu_narrow_activations_stay_on_the_grid_and_keep_int8_kernels(float_model_and_data, bits):
    model, data = float_model_and_data
    eight = _quantize(model, data)
    narrow = _quantize(model, data, weight_bits=bits, activation_bits=bits)
    clips = [n for n in narrow.graph.node if n.op_type == "Clip" and n.input[0].endswith("_quantized")]
    assert clips, "an integer Clip should follow each activation QuantizeLinear"
    assert _activation_levels(narrow, data) <= 2 ** bits
    assert _activation_levels(eight, data) > 2 ** bits
    assert kernel_coverage(narrow).integer_kernels == kernel_coverage(eight).integer_kernels


def test_narrow_weights_are_stored_in_int8_on_the_narrow_grid(float_model_and_data):
    model, data = float_model_and_data
    narrow = _quantize(model, data, weight_bits=4, activation_bits=8)
    weights = [onnx.numpy_helper.to_array(t) for t in narrow.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 4]
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() <= 7 for w in weights)


def test_accuracy_falls_with_bits_but_stays_usable(float_model_and_data):
    model, data = float_model_and_data
    held_out = structured_images(8, seed=99)
    reference = run_ort(model, {_input_name(model): held_out})[0]
    sqnr = {bits: sqnr_db(reference, run_ort(_quantize(model, data, weight_bits=bits, activation_bits=bits),
                                             {_input_name(model): held_out})[0]) for bits in (8, 6)}
    assert sqnr[8] > sqnr[6] > 10.0, sqnr


def test_tensorrt_clips_in_float_before_a_zero_point_free_quantizer(float_model_and_data):
    model, data = float_model_and_data
    narrow = _quantize(model, data, weight_bits=6, activation_bits=6, target="tensorrt")
    producers = {out: node for node in narrow.graph.node for out in node.output}
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in narrow.graph.initializer}
    activation_q = [n for n in narrow.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    assert activation_q and all(producers[n.input[0]].op_type == "Clip" for n in activation_q)
    assert not any(n.op_type == "Clip" and n.input[0].endswith("_quantized") for n in narrow.graph.node)
    assert all(not constants[n.input[2]].any() for n in activation_q)
    assert _activation_levels(narrow, data) <= 2 ** 6 - 1   # symmetric: [-31, 31]


def test_reconstruction_learns_on_the_narrow_grid(float_model_and_data):
    model, data = float_model_and_data
    config = QuantConfig(weight_bits=6, activation_bits=6, fast=False,
                         reconstruction=ReconstructionConfig(iterations=4, batch_size=4))
    narrow = onnxrepq.quantize(model, data, config)
    assert _activation_levels(narrow, data) <= 2 ** 6
    run_ort(narrow, {_input_name(model): data[:2]})
