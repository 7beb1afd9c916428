"""DropRedundantClips (emit/redundant_clips.py): a Relu/Clip the next quantizer enforces is removed, exactly,
and onnxruntime then fuses the conv before it, also on 6-bit grids where it would not drop the clip itself."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from onnx import helper

from onnxrepq.emit.coverage import optimized_model
from onnxrepq.emit.redundant_clips import DropRedundantClips
from tests.models_for_tests import apply_passes, make_model, op_types, run_ort

rng = np.random.default_rng(4)


def conv_clip_quantize(activation: str, scale: float, zero_point: int, narrow_top: int | None):
    """x -> Q/DQ -> Conv -> activation -> Q -> [integer Clip(zp, narrow_top)] -> DQ -> y."""
    inits = {"xs": np.float32(0.05), "xz": np.uint8(128), "w": rng.integers(-64, 65, (8, 4, 3, 3)).astype(np.int8),
             "ws": np.full(8, 0.004, np.float32), "wz": np.zeros(8, np.int8), "lo": np.float32(0.0),
             "hi": np.float32(1.0), "ys": np.float32(scale), "yz": np.uint8(zero_point)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["a"]) if activation == "Relu" else
             helper.make_node("Clip", ["c", "lo", "hi"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "ys", "yz"], ["aq"])]
    if narrow_top is not None:
        inits |= {"qmin": np.uint8(zero_point), "qmax": np.uint8(narrow_top)}
        nodes.append(helper.make_node("Clip", ["aq", "qmin", "qmax"], ["an"]))
    nodes.append(helper.make_node("DequantizeLinear", ["an" if narrow_top is not None else "aq", "ys", "yz"], ["y"]))
    return make_model(nodes, {"x": [2, 4, 8, 8]}, ["y"], inits)


CASES = {   # activation, scale, zero point, integer clip top; whether the activation is redundant
    "unit_clip_8bit": ("Clip", 1 / 255, 0, None, True),
    "unit_clip_6bit": ("Clip", 1 / 63, 0, 63, True),     # onnxruntime alone keeps this one float
    "relu_6bit": ("Relu", 0.02, 0, 63, True),
    "clip_grid_below_its_bound": ("Clip", 2 / 255, 10, None, False),   # past 1 too: fitting needs the low end
    "relu_below_zero": ("Relu", 0.02, 10, None, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_only_enforced_activations_go_and_outputs_stay_equal(case):
    activation, scale, zero_point, narrow_top, redundant = CASES[case]
    model = conv_clip_quantize(activation, scale, zero_point, narrow_top)
    after, (record,) = apply_passes(model, [DropRedundantClips()])
    removed = len(op_types(model)) - len(op_types(after))
    assert removed == (1 if redundant else 0) and record.modified == redundant
    feeds = {"x": rng.uniform(-8, 8, (2, 4, 8, 8)).astype(np.float32)}   # far past every bound
    before_out, after_out = run_ort(model, feeds, optimize=False)[0], run_ort(after, feeds, optimize=False)[0]
    assert np.array_equal(before_out, after_out)


def test_conv_before_a_narrow_grid_becomes_qlinearconv_once_the_clip_is_gone():
    model = conv_clip_quantize("Clip", 1 / 63, 0, 63)
    kept = collections.Counter(n.op_type for n in optimized_model(model).graph.node)
    # what onnxruntime does with the clip in place: a float conv with the clip fused into it
    assert kept["QLinearConv"] == 0 and kept["Conv"] + kept["FusedConv"] == 1
    after, _ = apply_passes(model, [DropRedundantClips()])
    fused = collections.Counter(n.op_type for n in optimized_model(after).graph.node)
    assert fused["QLinearConv"] == 1 and fused["Conv"] == 0


def test_grid_grown_past_the_clip_is_fitted_to_it_and_the_conv_fuses():
    """A learned step that carries a [0, 1] gate's grid to 1.1 (the default recipe on PP-OCRv4 det left 33 convs
    float that way): the step shrinks so the grid ends at 1, the clip goes, onnxruntime makes a QLinearConv."""
    model = conv_clip_quantize("Clip", 1.1 / 255, 0, None)
    before = collections.Counter(n.op_type for n in optimized_model(model).graph.node)
    assert before["QLinearConv"] == 0
    after, (record,) = apply_passes(model, [DropRedundantClips()])
    assert "Clip" not in op_types(after) and record.modified
    scale = next(i for i in after.graph.initializer if i.name == "ys")
    assert np.rint(np.float32(1.0) / np.frombuffer(scale.raw_data, np.float32)[0]) >= 255
    fused = collections.Counter(n.op_type for n in optimized_model(after).graph.node)
    assert fused["QLinearConv"] == 1
    feeds = {"x": rng.uniform(-8, 8, (2, 4, 8, 8)).astype(np.float32)}
    out = run_ort(after, feeds, optimize=False)[0]
    assert out.min() >= 0 and out.max() <= 1.0 + 1e-6 and np.isclose(out.max(), 1.0)   # the clip still holds
