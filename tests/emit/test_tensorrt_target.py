"""--target tensorrt: the QDQ layout TensorRT's explicit quantization fuses, on a torch-built net.

TensorRT's rules (developer guide, Q/DQ layer placement): int8 symmetric activations (zero point 0),
weights per output channel (axis 0 for Conv, 1 for ConvTranspose's [Cin, Cout, k, k]), Q/DQ on the
inputs of weighted layers and on the identity input of a residual Add (not on the conv->Add edge, so
the add fuses into the conv epilogue), no Q/DQ feeding only float ops, float biases, opset >= 13.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxrepq
from onnxrepq.config import QuantConfig
from onnxrepq.emit.targets import TENSORRT
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, run_ort, sqnr_db, structured_images

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SQNR_FLOOR_DB = 25.0   # measured 31.9 dB (onnxruntime 1.32 CPU, --fast)


@pytest.fixture(scope="module")
def models():
    calibration = structured_images(16, seed=5)
    model = export_torch(MobileBlocksNet(deconv=True), calibration[:1])
    return model, onnxrepq.quantize(model, calibration, QuantConfig(target="tensorrt", fast=True))


def producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model, name):
    return [node for node in model.graph.node if name in node.input]


def initializers(model):
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_every_quantizer_is_int8_with_zero_zero_point(models):
    quantized = models[1]
    values = initializers(quantized)
    qdq = [n for n in quantized.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(values[n.input[2]].dtype == np.int8 and not values[n.input[2]].any() for n in qdq)
    assert not any(v.dtype in (np.uint8, np.int32) for v in values.values())   # no uint8, no int32 bias
    assert max(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) >= 13


def test_weighted_layers_read_dq_inputs_and_per_channel_weights(models):
    quantized = models[1]
    made_by, values = producers(quantized), initializers(quantized)
    weighted = [n for n in quantized.graph.node if n.op_type in WEIGHTED]
    assert {n.op_type for n in weighted} == {"Conv", "ConvTranspose"} and len(weighted) == 10
    for node in weighted:
        assert made_by[node.input[0]].op_type == "DequantizeLinear"
        weight_dq = made_by[node.input[1]]
        weight = values[weight_dq.input[0]]
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert axis == (1 if node.op_type == "ConvTranspose" else 0)
        assert weight.dtype == np.int8 and values[weight_dq.input[1]].size == weight.shape[axis]
        if len(node.input) > 2:   # float bias, straight from an initializer
            assert node.input[2] in values and values[node.input[2]].dtype == np.float32


def test_residual_add_quantizes_the_identity_input_only(models):
    quantized = models[1]
    made_by = producers(quantized)
    adds = [n for n in quantized.graph.node if n.op_type == "Add"]
    assert adds
    for add in adds:
        sources = sorted(made_by[name].op_type for name in add.input)
        assert sources == ["Conv", "DequantizeLinear"]


def test_no_quantizer_feeds_only_float_ops(models):
    quantized = models[1]
    integer_ops = set(WEIGHTED) | TENSORRT.int8_ops | TENSORRT.passthrough_ops
    for dq in (n for n in quantized.graph.node if n.op_type == "DequantizeLinear"):
        readers = consumers(quantized, dq.output[0])
        assert readers and all(r.op_type in integer_ops for r in readers), dq.name


def test_runs_in_onnxruntime_close_to_float(models):
    model, quantized = models
    data = structured_images(8, seed=6)
    assert sqnr_db(run_ort(model, {"x": data})[0], run_ort(quantized, {"x": data})[0]) >= SQNR_FLOOR_DB
