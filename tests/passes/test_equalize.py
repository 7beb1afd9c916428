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
    assert records[0].notes[0] == "1 conv pairs equalized (0 on activation ranges)"


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


def _ranges(model, feeds):
    """Per-channel absmax of the tensor each pair's second conv reads, as the pipeline gathers them."""
    import onnx_graphsurgeon as gs

    from onnxrepq.calibrate.channel_stats import collect_channel_stats
    from onnxrepq.passes.equalize import equalization_pairs

    tensors = [pair.second.inputs[0].name for pair in equalization_pairs(gs.import_onnx(model))]
    return {name: stats.channel_absmax for name, stats in collect_channel_stats(model, tensors, feeds).items()}


def test_data_aware_pairs_are_exact_and_balance_the_activation():
    from onnxrepq.calibrate.channel_stats import collect_channel_stats

    for activation, groups in (("Relu", 1), ("Relu", 8), (None, 1)):
        model = _pair_model(activation, groups=groups)
        feeds = [{"x": np.random.default_rng(seed).standard_normal((2, 4, 9, 9)).astype(np.float32)}
                 for seed in range(4)]
        ranges = _ranges(model, feeds)
        after, records = apply_passes(model, [EqualizeCrossLayer(EqualizeConfig(tolerance=1.0), ranges)])
        assert records[0].notes[0] == "1 conv pairs equalized (1 on activation ranges)"
        assert_same_outputs(model, after, feeds[0], rtol=1e-5)
        tensor = next(iter(ranges))
        before = ranges[tensor]
        now = collect_channel_stats(after, [tensor], feeds)[tensor].channel_absmax
        live = before > 0
        # the rows span 0.01 .. 50 (3.7 decades); equalized, the activation channels come much closer
        assert np.ptp(np.log10(now[live])) < 0.6 * np.ptp(np.log10(before[live]))


def test_balanced_channels_are_left_alone():
    model = _pair_model("Relu")
    feeds = [{"x": np.random.default_rng(5).standard_normal((2, 4, 9, 9)).astype(np.float32)}]
    tensor = next(iter(_ranges(model, feeds)))
    even = {tensor: np.full(8, 3.0)}
    # with every channel range equal and the default tolerance, the column shares alone (within 4x) move nothing
    after, records = apply_passes(model, [EqualizeCrossLayer(activation_ranges=even)])
    original = {i.name: i for i in model.graph.initializer}
    changed = [i.name for i in after.graph.initializer if "equalized" in i.name]
    assert changed == [] or all(name in original for name in changed)


def test_silent_channels_get_scaled_like_their_neighbours():
    """A channel that stays zero on the data keeps no large weight column to spoil the next conv's rows."""
    from onnxrepq.passes.equalize import _fill_silent

    activation = np.array([2.0, 4.0, 0.0, 0.0])
    rows = np.array([1.0, 2.0, 100.0, 0.01])
    filled = _fill_silent(activation, rows)
    assert np.allclose(filled, [2.0, 4.0, 200.0, 0.02])


def test_equalize_runs_on_calibration_data_in_the_pipeline():
    import onnxrepq
    from onnxrepq.api import normalize, quantize_with_result

    model = _pair_model("Relu")
    _, records = normalize(model, onnxrepq.QuantConfig(equalize=True))
    assert not any(r.name == "equalize" for r in records)  # needs data: runs in quantize, not normalize
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 4, 9, 9)).astype(np.float32)}
    result = quantize_with_result(model, feeds["x"], onnxrepq.QuantConfig(equalize=True))
    assert [r.notes[0] for r in result.passes if r.name == "equalize"] == [
        "1 conv pairs equalized (1 on activation ranges)"]
    assert_same_outputs(model, result.float_model, feeds, rtol=1e-5)
    reference = run_ort(model, feeds)[0]
    assert sqnr_db(reference, run_ort(result.model, feeds)[0]) > 25


def _held_out_sqnr(model, quantized, inputs):
    return sqnr_db(np.concatenate([run_ort(model, {"x": x[None]})[0] for x in inputs]),
                   np.concatenate([run_ort(quantized, {"x": x[None]})[0] for x in inputs]))


def test_unbalanced_torch_nets_gain_6_db_and_keep_float_outputs():
    """Issue #10's bar: dw->pw and RepVGG nets with x100 / x0.01 channels, --fast INT8."""
    import onnxrepq
    from onnxrepq.api import fuse, quantize_with_result
    from tests.passes.unbalanced_nets import build

    for kind in ("dwpw", "rep"):
        model = build(kind, seed=0)
        inputs = np.random.default_rng(100).standard_normal((48, 3, 16, 16)).astype(np.float32)
        calibration, held_out = inputs[:32], inputs[32:]
        plain = onnxrepq.quantize(model, calibration, onnxrepq.QuantConfig(fast=True, equalize=False))
        result = quantize_with_result(model, calibration, onnxrepq.QuantConfig(fast=True, equalize=True))
        gain = _held_out_sqnr(model, result.model, held_out) - _held_out_sqnr(model, plain, held_out)
        assert gain >= 6.0, (kind, gain)
        # Against the fused float model: fusing x100 RepVGG branches alone moves the output by ~4e-5
        # in float32; the equalization itself (no high-bias absorption by default) must not move it
        # on any input.
        for x in held_out[:4]:
            assert_same_outputs(fuse(model), result.float_model, {"x": x[None]}, rtol=1e-5)


def _high_bias_model(pads: int):
    """Conv (a quarter of its channels biased far above their reach) -> Relu -> Conv 1x1 or padded 3x3.

    Inputs in [0, 1] and weights in [-0.1, 0.1] keep every pre-activation within 3.6 of its bias, so
    the channels biased by +6..+9 never reach the Relu's cut; the others mostly sit at it.
    """
    generator = np.random.default_rng(11)
    w1 = generator.uniform(-0.1, 0.1, (8, 4, 3, 3)).astype(np.float32)
    b1 = np.where(np.arange(8) % 4 == 0, generator.uniform(6, 9, 8), generator.normal(0, 0.2, 8)).astype(np.float32)
    kernel = 1 if pads == 0 else 3
    w2 = generator.normal(0, 0.3, (6, 8, kernel, kernel)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["y"], pads=[pads] * 4)]
    return make_model(nodes, {"x": ["n", 4, 9, 9]}, ["y"], {"w1": w1, "b1": b1, "w2": w2})


def _uniform_feeds(seed: int, count: int = 4):
    generator = np.random.default_rng(seed)
    return [{"x": generator.uniform(0, 1, (2, 4, 9, 9)).astype(np.float32)} for _ in range(count)]


def test_high_bias_absorption_is_exact_where_the_minima_hold_and_shrinks_the_range():
    from onnxrepq.passes.equalize import channel_extremes

    model = _high_bias_model(pads=0)
    calibration = _uniform_feeds(20)
    ranges, minima = channel_extremes(model, ["a1"], calibration)
    assert np.count_nonzero(minima["a1"] > 5) == 2 and np.count_nonzero(minima["a1"] > 0) < 8
    results = {}
    for absorb in (False, True):
        config = EqualizeConfig(tolerance=1.0, absorb_high_bias=absorb)
        after, records = apply_passes(model, [EqualizeCrossLayer(config, ranges, minima)])
        for feed in calibration:   # exact where the minima hold; new data may dip below them
            assert_same_outputs(model, after, feed, rtol=1e-5)
        results[absorb] = (channel_extremes(after, ["a1"], calibration), records[0].notes)
    (plain_max, plain_min), _ = results[False]
    (absorbed_max, absorbed_min), notes = results[True]
    high = plain_min["a1"] > 0
    assert any(note.startswith("high bias absorbed in 1 pairs: a1 (") for note in notes), notes
    assert f"({np.count_nonzero(high)}/8" in " ".join(notes)
    # each absorbed channel now starts at 0 and spans only what lay above its old minimum
    assert np.all(absorbed_min["a1"][high] < 1e-4 * plain_max["a1"][high])
    np.testing.assert_allclose(absorbed_max["a1"][high], (plain_max["a1"] - plain_min["a1"])[high], rtol=1e-4)
    assert absorbed_max["a1"].max() < 0.5 * plain_max["a1"].max()


def test_padded_second_conv_keeps_its_high_bias():
    """At the border a padded conv reads zeros that stand for -c after absorption: no bias can fix that."""
    from onnxrepq.passes.equalize import channel_extremes

    model = _high_bias_model(pads=1)
    calibration = _uniform_feeds(22)
    ranges, minima = channel_extremes(model, ["a1"], calibration)
    after, records = apply_passes(model, [EqualizeCrossLayer(EqualizeConfig(rounds=0, absorb_high_bias=True),
                                                             ranges, minima)])
    assert records[0].notes[-1] == "high bias left in 1 pairs whose second conv pads its input: a1"
    assert not any(init.name.endswith("__equalized_bias") for init in after.graph.initializer)
    for feed in calibration:
        assert_same_outputs(model, after, feed, rtol=1e-5)


def test_quantize_absorbs_high_biases_and_keeps_the_float_model():
    import onnxrepq
    from onnxrepq.api import quantize_with_result

    model = _high_bias_model(pads=0)
    calibration = np.concatenate([feed["x"] for feed in _uniform_feeds(23, count=8)])
    result = quantize_with_result(model, calibration, onnxrepq.QuantConfig(fast=True, equalize=True,
                                                                           absorb_high_bias=True))
    notes = next(r.notes for r in result.passes if r.name == "equalize")
    assert any(note.startswith("high bias absorbed in 1 pairs") for note in notes), notes
    for feed in _uniform_feeds(24):
        assert_same_outputs(model, result.float_model, feed, rtol=1e-5)


def _gated_model(second_groups: int, offset_shape=(1,), divide_first: bool = False):
    """Conv -> x * Clip(depthwise 1x1(x), 0, 1) -> Mul(scalar) -> Add(offset) -> padded Conv: HardSwish after
    passes/hard_gates.py with PP-LCNetV3's learnable affine behind it, channels 100x apart."""
    channels = 8
    w1 = weights(channels, 4, 3, 3) * np.geomspace(0.05, 5.0, channels).reshape(-1, 1, 1, 1).astype(np.float32)
    gate = np.full((channels, 1, 1, 1), 1.0 / 6.0, np.float32)
    w2 = weights(6 if second_groups == 1 else channels, channels // second_groups, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "gw", "gb"], ["g0"], group=channels),
             helper.make_node("Clip", ["g0", "lo", "hi"], ["g1"]),
             helper.make_node("Mul", ["c1", "g1"], ["hs"]),
             helper.make_node("Mul", ["a", "hs"], ["m"]),
             helper.make_node("Div", ["a", "m"] if divide_first else ["m", "a"], ["d"]),
             helper.make_node("Add", ["d", "b"], ["lab"]),
             helper.make_node("Conv", ["lab", "w2"], ["y"], pads=[1, 1, 1, 1], group=second_groups)]
    inits = {"w1": w1, "b1": weights(channels), "gw": gate, "gb": np.full(channels, 0.5, np.float32),
             "lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32), "a": np.array([0.7], np.float32),
             "b": np.linspace(-0.3, 0.2, int(np.prod(offset_shape))).astype(np.float32).reshape(offset_shape),
             "w2": w2}
    return make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": [2, w2.shape[0], 9, 9]}, inits)


def test_pairs_through_a_gated_hardswish_and_an_affine_are_exact_and_balance_the_activation():
    from onnxrepq.calibrate.channel_stats import collect_channel_stats

    for groups, offset_shape in ((1, (1,)), (8, (1, 8, 1, 1)), (1, (8, 1, 1))):
        model = _gated_model(groups, offset_shape)
        feeds = [{"x": np.random.default_rng(seed).standard_normal((2, 4, 9, 9)).astype(np.float32)}
                 for seed in range(4)]
        ranges = _ranges(model, feeds)
        assert list(ranges) == ["lab"]
        after, records = apply_passes(model, [EqualizeCrossLayer(EqualizeConfig(tolerance=1.0), ranges)])
        assert records[0].notes[0] == "1 conv pairs equalized (1 on activation ranges)"
        for feed in feeds:   # the padded second conv reads zeros at the border: the divided offset keeps that exact
            assert_same_outputs(model, after, feed, rtol=1e-5)
        for tensor in ("c1", "lab"):   # both the conv output and the tensor the next conv reads come closer
            before = collect_channel_stats(model, [tensor], feeds)[tensor].channel_absmax
            now = collect_channel_stats(after, [tensor], feeds)[tensor].channel_absmax
            assert np.ptp(np.log10(now)) < 0.6 * np.ptp(np.log10(before)), (groups, offset_shape, tensor)


def test_paths_that_do_not_commute_with_a_channel_scale_are_left_alone():
    import onnx_graphsurgeon as gs

    from onnxrepq.passes.equalize import equalization_pairs

    divided = _gated_model(1, divide_first=True)          # a / x
    spatial = _gated_model(1, offset_shape=(1, 1, 9, 9))  # an offset that varies along the image
    for model in (divided, spatial):
        assert equalization_pairs(gs.import_onnx(model)) == []
        after, records = apply_passes(model, [EqualizeCrossLayer()])
        assert not records[0].modified


def test_a_squeeze_excite_gate_keeps_its_pair_out():
    """x * sigmoid(conv(relu(conv(pool(x))))): exact to equalize, but its dense first conv would pay
    for the scale in its row grids, so only the gate's own conv -> relu -> conv pair is taken."""
    import onnx_graphsurgeon as gs

    from onnxrepq.passes.equalize import equalization_pairs

    channels = 8
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["p"]),
             helper.make_node("Conv", ["p", "sw1", "sb1"], ["s1"]),
             helper.make_node("Relu", ["s1"], ["s2"]),
             helper.make_node("Conv", ["s2", "sw2", "sb2"], ["s3"]),
             helper.make_node("Sigmoid", ["s3"], ["s4"]),
             helper.make_node("Mul", ["s4", "c1"], ["se"]),
             helper.make_node("Conv", ["se", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = {"w1": weights(channels, 4, 3, 3), "b1": weights(channels), "sw1": weights(4, channels, 1, 1),
             "sb1": weights(4), "sw2": weights(channels, 4, 1, 1), "sb2": weights(channels),
             "w2": weights(6, channels, 3, 3)}
    model = make_model(nodes, {"x": [2, 4, 9, 9]}, {"y": [2, 6, 9, 9]}, inits)
    assert [pair.second.inputs[0].name for pair in equalization_pairs(gs.import_onnx(model))] == ["s2"]
