"""tools/error_split.py: each graph it builds removes exactly the error it names."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch

from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, sqnr_db, structured_images
from tools.error_split import float_weights, with_float_weights, without_activation_rounding


def _run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_the_split_graphs_remove_what_they_say():
    torch.manual_seed(0)
    calibration = structured_images(16, seed=4)
    model = export_torch(MobileBlocksNet(), calibration[:1])
    result = quantize_with_result(model, calibration, QuantConfig(fast=True, bias_correction=False))
    feeds = {model.graph.input[0].name: calibration[:4]}   # inside the calibrated ranges: clipping costs ~nothing
    reference = _run(result.float_model, feeds)
    weights = float_weights(result.float_model)
    int8 = sqnr_db(reference, _run(result.model, feeds))
    activations = with_float_weights(gs.import_onnx(result.model), weights)
    assert not any(n.op == "DequantizeLinear" and n.outputs[0].outputs and n.outputs[0].outputs[0].op == "Conv"
                   and n.outputs[0].outputs[0].inputs[1] is n.outputs[0] for n in activations.nodes)
    activations_only = sqnr_db(reference, _run(gs.export_onnx(activations), feeds))
    rounding_free = without_activation_rounding(gs.import_onnx(result.model))
    assert not any(n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant) for n in rounding_free.nodes)
    weights_only = sqnr_db(reference, _run(gs.export_onnx(rounding_free), feeds))
    clipping_only = sqnr_db(reference, _run(gs.export_onnx(with_float_weights(rounding_free, weights)), feeds))
    assert activations_only > int8 and weights_only > int8
    # float weights, no rounding, inputs within the ranges: float up to the int32 bias rounding
    assert clipping_only > max(activations_only, weights_only) + 15.0
