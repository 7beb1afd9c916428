"""Reconstruction below 8-bit activations: a block cut behind the integer Clip of a narrow grid.

At 6 bits each activation QuantizeLinear is followed by an integer Clip (``X_quantized`` ->
``X_quantized_narrow``, passes/insert_qdq.py) before its DequantizeLinears. A fan-out tensor is cut
there, so the block before it ends on integers: it must be supervised through the DequantizeLinear
as ``X_quantized`` is at 8 bits. Before the fix such blocks had no supervised output and kept nearest
rounding unlearned (PP-OCRv4 rec W6A6: the first 6 blocks, 12 conv layers of the stem, and 3 more).
"""
from __future__ import annotations

import numpy as np
import pytest

from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig, ReconstructionConfig
from onnxrepq.reconstruct import learn
from onnxrepq.reconstruct.learn import ReconstructBlocks, float_name
from onnxrepq.reconstruct.partition import partition
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, structured_images


@pytest.fixture(scope="module")
def net_and_data():
    import torch
    torch.manual_seed(0)
    calibration = structured_images(8, seed=7)
    return export_torch(MobileBlocksNet(), calibration[:1]), calibration


def _reconstruct(model, data, bits: int):
    """The ReconstructBlocks pass of a W{bits}A{bits} quantization, and the block outputs it was cut at."""
    seen: dict = {}
    original = ReconstructBlocks.__call__

    def spy(instance, graph):
        seen["outputs"] = [o for stage in partition(graph, max_layers_per_block=instance.config.max_layers_per_block)
                           for b in stage.blocks for o in b.outputs]
        seen["comparable"] = learn._comparable(graph, seen["outputs"])
        seen["pass"] = instance
        return original(instance, graph)

    patch = pytest.MonkeyPatch()
    patch.setattr(ReconstructBlocks, "__call__", spy)
    try:
        quantize_with_result(model, {model.graph.input[0].name: data}, QuantConfig(
            weight_bits=bits, activation_bits=bits, fast=False,
            reconstruction=ReconstructionConfig(iterations=8, batch_size=4)))
    finally:
        patch.undo()
    return seen


def test_float_name_strips_the_narrow_clip_suffix():
    assert float_name("x_quantized_narrow") == "x"
    assert float_name("x_quantized") == "x"


@pytest.mark.parametrize("bits", [8, 6])
def test_every_block_is_supervised_at_narrow_activation_grids(net_and_data, bits):
    model, data = net_and_data
    seen = _reconstruct(model, data, bits)
    if bits == 6:   # the case under test exists: a block ends on the narrow clip's integers
        assert any(name.endswith("_quantized_narrow") for name in seen["outputs"]), seen["outputs"]
    assert not any(name.endswith(("_quantized", "_quantized_narrow")) for name in seen["comparable"])
    reports = seen["pass"].reports
    nearest = np.array([r.nearest_loss for r in reports])
    learned = np.array([r.learned_loss for r in reports])
    assert not np.isnan(nearest).any(), [(r.name, r.nearest_loss) for r in reports]
    assert np.all(learned <= nearest)
