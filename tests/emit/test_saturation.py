"""The weight range that keeps onnxruntime's u8 x s8 kernels exact on CPUs without VNNI.

Machine-independent check: with reduced weights, the model onnxruntime optimizes into integer
kernels computes what the unoptimized QDQ graph computes, whatever this CPU's instruction set.
"""
from __future__ import annotations

import onnxruntime as ort
import pytest

import onnxrepq
from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig
from onnxrepq.emit import saturation
from onnxrepq.search.quant_grid import activation_grid, weight_grid
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, sqnr_db, structured_images


def test_pair_overflow_and_the_reduced_grid():
    u8, s8 = activation_grid(8, signed=False), activation_grid(8, signed=True)
    assert saturation.pairs_overflow(u8, weight_grid(8))
    assert not saturation.pairs_overflow(u8, weight_grid(7))
    assert not saturation.pairs_overflow(activation_grid(7, signed=False), weight_grid(8))
    assert not saturation.pairs_overflow(s8, weight_grid(8))
    reduced = saturation.reduced_weight_grid(u8, weight_grid(8))
    assert (reduced.qmin, reduced.qmax) == (-64, 64)   # 255 * 64 * 2 = 32640 fits int16
    assert not saturation.pairs_overflow(u8, reduced)


def test_resolve_weight_range(monkeypatch):
    monkeypatch.setattr(saturation, "host_saturates_u8s8", lambda: True)
    assert saturation.resolve_weight_range("auto", target_saturates=True) == "reduced"
    assert saturation.resolve_weight_range("auto", target_saturates=False) == "full"
    monkeypatch.setattr(saturation, "host_saturates_u8s8", lambda: False)
    assert saturation.resolve_weight_range("auto", target_saturates=True) == "full"
    assert saturation.resolve_weight_range("reduced", target_saturates=False) == "reduced"
    assert saturation.resolve_weight_range("paired", target_saturates=False) == "paired"
    assert saturation.resolve_weight_range("full", target_saturates=True) == "full"


def _run(model, feeds, optimize: bool):
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("weight_range", ["reduced", "paired", "auto"])
def test_integer_kernels_compute_what_the_qdq_graph_says(weight_range):
    calibration = structured_images(16, seed=7)
    model = export_torch(MobileBlocksNet(), calibration[:1])
    quantized = onnxrepq.quantize(model, calibration, QuantConfig(weight_range=weight_range, fast=True))
    feeds = {model.graph.input[0].name: structured_images(4, seed=99)}
    simulated, fused = _run(quantized, feeds, optimize=False), _run(quantized, feeds, optimize=True)
    # int8 kernels requantize differently from float QDQ by a step here and there; a saturating
    # kernel is off by whole ranges (about 20 dB here)
    assert sqnr_db(simulated, fused) > 35.0


def test_reduced_weights_are_reported():
    calibration = structured_images(8, seed=3)
    model = export_torch(MobileBlocksNet(), calibration[:1])
    result = quantize_with_result(model, calibration, QuantConfig(weight_range="reduced", fast=True))
    assert any(r.name == "weight_range" for r in result.passes)
    bits = {row["weight_bits"] for row in result.layers if "weight_bits" in row}
    assert bits == {7}
