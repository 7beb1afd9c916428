"""Cross-layer equalization: exact in float, balancing, and what it must leave alone."""
import numpy as np
from onnx import helper

from onnxrepq.passes.equalize import EqualizeConfig, EqualizeCrossLayer
from tests.models_for_tests import apply_passes, assert_same_outputs, make_model, run_ort, sqnr_db, weights


def _pair_model(activation: str | None, groups: int = 1, channels: int = 8):
    w1 = weights(channels, 4, 3, 3)
    w1 *= np.geomspace(0.01, 50.0, channels).reshape(-1, 1, 1, 1).astype(np.float32)  # unbalanced rows
    w2 = weights(6 if groups == 1 else channels, channels // groups, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])]
    source = "c1"
    if activation:
        nodes.append(helper.make_node(activation, ["c1"], ["a1"]))
        source = "a1"
    nodes.append(helper.make_node("Conv", [source, "w2"], ["y"], pads=[1, 1, 1, 1], group=groups))
    inits = {"w1": w1, "b1": weights(channels), "w2": w2}
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": [2, w2.shape[0], 9, 9]}, inits)


def _row_ranges(model, name_part):
    for init in model.graph.initializer:
        if name_part in init.name:
            from onnx import numpy_helper
            value = numpy_helper.to_array(init)
            return np.abs(value.reshape(value.shape[0], -1)).max(axis=1)
    raise AssertionError(name_part)


def test_relu_pair_is_exact_and_balances_the_first_conv():
    model = _pair_model("Relu")
    after, records = apply_passes(model, [EqualizeCrossLayer()])
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32)}
    assert_same_outputs(model, after, feeds, rtol=1e-5)
    before_spread = np.ptp(np.log10(_row_ranges(model, "w1")))
    after_spread = np.ptp(np.log10(_row_ranges(after, "c1__equalized_weight")))
    # r1 becomes sqrt(r1 * r2): half the log-spread of r1 plus half of the (small) spread of r2
    assert after_spread < 0.6 * before_spread
    assert records[0].notes[0] == "1 conv pairs equalized"


def test_depthwise_second_conv_and_no_activation_are_exact():
    for activation, groups in (("Relu", 8), (None, 1)):
        model = _pair_model(activation, groups=groups)
        after, records = apply_passes(model, [EqualizeCrossLayer()])
        feeds = {"x": np.random.default_rng(2).standard_normal((2, 4, 9, 9)).astype(np.float32)}
        assert_same_outputs(model, after, feeds, rtol=1e-5)
        assert records[0].notes


def test_scales_are_capped_and_reported():
    model = _pair_model("Relu")
    after, records = apply_passes(model, [EqualizeCrossLayer(EqualizeConfig(max_scale=2.0))])
    assert any("capped" in note for note in records[0].notes)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 4, 9, 9)).astype(np.float32)}
    assert_same_outputs(model, after, feeds, rtol=1e-5)


def test_non_homogeneous_activations_are_left_alone():
    for activation in ("Sigmoid", "HardSwish"):
        model = _pair_model(activation)
        after, records = apply_passes(model, [EqualizeCrossLayer()])
        assert not records[0].modified
        assert not any("equalized" in init.name for init in after.graph.initializer)


def test_equalize_option_reaches_the_pipeline_and_keeps_float_outputs():
    import onnxrepq
    from onnxrepq.api import normalize

    model = _pair_model("Relu")
    _, records = normalize(model, onnxrepq.QuantConfig(equalize=True))
    assert any(r.name == "equalize" and r.modified for r in records)
    _, records = normalize(model, onnxrepq.QuantConfig())
    assert not any(r.name == "equalize" for r in records)
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 4, 9, 9)).astype(np.float32)}
    quantized = onnxrepq.quantize(model, feeds["x"], onnxrepq.QuantConfig(equalize=True))
    reference = run_ort(model, feeds)[0]
    assert sqnr_db(reference, run_ort(quantized, feeds)[0]) > 25
