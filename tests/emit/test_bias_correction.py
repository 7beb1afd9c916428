"""CorrectBias on tiny nets at 4-bit weights, where rounding leaves each channel a systematic shift."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxrepq import cli
from onnxrepq.api import quantize_with_result
from onnxrepq.config import BiasCorrectionConfig, QuantConfig, ReconstructionConfig
from onnxrepq.emit import bias_correction
from onnxrepq.emit.bias_correction import CorrectBias, _ClippedMean
from onnxrepq.errors import UserError
from tests.models_for_tests import make_model, run_ort, sqnr_db

rng = np.random.default_rng(7)
# Non-negative inputs (like anything after a Relu): weight rounding errors then add up per channel.
CALIBRATION = rng.uniform(0.0, 1.0, (32, 3, 12, 12)).astype(np.float32)
HELD_OUT = rng.uniform(0.0, 1.0, (32, 3, 12, 12)).astype(np.float32)
W4 = QuantConfig(weight_bits=4, fast=True, bias_correction=False)


def _chain_model() -> onnx.ModelProto:
    """Conv (bias) -> Relu -> Conv (no bias) -> Relu -> Conv (bias) -> y, with a tap on each conv output."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3"),
    ]
    inits = {"w1": rng.normal(0.05, 0.3, (16, 3, 3, 3)).astype(np.float32),
             "b1": rng.normal(0, 0.1, 16).astype(np.float32),
             "w2": rng.normal(0.02, 0.15, (16, 16, 3, 3)).astype(np.float32),
             "w3": rng.normal(0, 0.3, (8, 16, 1, 1)).astype(np.float32),
             "b3": rng.normal(0, 0.1, 8).astype(np.float32)}
    return make_model(nodes, {"x": ["n", 3, 12, 12]}, {"y": ["n", 8, 12, 12]}, inits)


def _gemm_model() -> onnx.ModelProto:
    """Flatten -> Gemm (no bias) -> Relu -> MatMul -> Add(bias) -> y."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w1"], ["g"], transB=1, name="gemm"),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b2"], ["y"], name="add"),
    ]
    inits = {"w1": rng.normal(0.01, 0.05, (32, 3 * 12 * 12)).astype(np.float32),
             "w2": rng.normal(0.02, 0.3, (32, 10)).astype(np.float32),
             "b2": rng.normal(0, 0.1, 10).astype(np.float32)}
    return make_model(nodes, {"x": ["n", 3, 12, 12]}, {"y": ["n", 10]}, inits)


def _channel_mean_error(reference: np.ndarray, value: np.ndarray, axis: int = 1) -> float:
    """The mean over channels of |mean over everything else of (float - quantized)|."""
    difference = np.moveaxis(reference.astype(np.float64) - value, axis, 0).reshape(reference.shape[axis], -1)
    return float(np.abs(difference.mean(axis=1)).mean())


@pytest.fixture(scope="module")
def chain():
    model = _chain_model()
    serialized = model.SerializeToString()
    plain = quantize_with_result(model, CALIBRATION, W4)
    corrected = quantize_with_result(model, CALIBRATION, W4.with_(bias_correction=True))
    assert model.SerializeToString() == serialized, "the float model must stay untouched"
    return model, plain, corrected


def test_corrected_output_has_smaller_mean_error_and_higher_sqnr(chain):
    model, plain, corrected = chain
    reference = run_ort(model, {"x": HELD_OUT})[0]
    before, after = run_ort(plain.model, {"x": HELD_OUT})[0], run_ort(corrected.model, {"x": HELD_OUT})[0]
    assert _channel_mean_error(reference, after) < 0.5 * _channel_mean_error(reference, before)
    assert sqnr_db(reference, after) > sqnr_db(reference, before) + 1.0


def test_every_conv_gets_an_int32_bias_and_the_model_is_valid(chain):
    _, _, corrected = chain
    onnx.checker.check_model(corrected.model)
    graph = gs.import_onnx(corrected.model)
    convs = [node for node in graph.nodes if node.op == "Conv"]
    assert len(convs) == 3
    for conv in convs:  # conv2 had none: the correction added it, QuantizeBias stored it
        assert len(conv.inputs) == 3 and conv.inputs[2].inputs[0].op == "DequantizeLinear"
        assert conv.inputs[2].inputs[0].inputs[0].values.dtype == np.int32
    record = next(r for r in corrected.passes if r.name == "correct_bias")
    assert record.modified and record.notes[0].startswith("3 biases corrected in 3 bands")
    assert record.notes[1].startswith("standard error of the measured shifts: median")


def _simulation_graph(model: onnx.ModelProto, monkeypatch) -> tuple[gs.Graph, onnx.ModelProto]:
    """The graph api.py hands the emit passes, and the normalized float model, captured on the way."""
    captured = {}
    original = quantize_with_result.__globals__["run_passes"]

    def capture(graph, passes, check=None):
        if any(getattr(p, "name", "") == "insert_qdq" for p in passes):
            graph, records = original(graph, passes[:1], check)
            captured["graph"] = graph.copy()
            return original(graph, passes[1:], check)[0], records
        return original(graph, passes, check)

    monkeypatch.setitem(quantize_with_result.__globals__, "run_passes", capture)
    result = quantize_with_result(model, CALIBRATION, W4)
    return captured["graph"], result.float_model


def _tap(graph: gs.Graph, names: list[str], feed: np.ndarray) -> dict[str, np.ndarray]:
    model = gs.export_onnx(graph)
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    values = run_ort(model, {"x": feed})
    return dict(zip([o.name for o in model.graph.output], values))


def test_layer_measure_matches_each_float_channel_mean_on_the_calibration_data(chain, monkeypatch):
    model = chain[0]
    graph, float_model = _simulation_graph(model, monkeypatch)
    feeds = [{"x": CALIBRATION[i:i + 1]} for i in range(len(CALIBRATION))]
    config = BiasCorrectionConfig(measure="layer")
    before = _tap(graph.copy(), ["c1", "c2"], CALIBRATION)
    graph = CorrectBias(float_model, feeds, config)(graph).graph
    reference = run_ort(_with_outputs(float_model, ["c1", "c2"]), {"x": CALIBRATION})
    after = _tap(graph, ["c1", "c2"], CALIBRATION)
    for name, value in zip(["y", "c1", "c2"], reference):
        # Every level was measured after the ones before it were corrected. What is left is the
        # bias rounding: onnxruntime runs DQ -> Conv with the bias on the input x weight grid.
        assert _channel_mean_error(value, after[name]) < 0.01 * _channel_mean_error(value, before[name])


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return copy


def test_activation_measure_matches_the_mean_after_the_relu(chain, monkeypatch):
    model = chain[0]
    graph, float_model = _simulation_graph(model, monkeypatch)
    feeds = [{"x": CALIBRATION[i:i + 1]} for i in range(len(CALIBRATION))]
    graph = CorrectBias(float_model, feeds, BiasCorrectionConfig(values_per_channel=1 << 16))(graph).graph
    reference = run_ort(_with_outputs(float_model, ["r1"]), {"x": CALIBRATION})[1]
    tapped = _tap(graph, ["c1"], CALIBRATION)["c1"]
    # the first layer sees exact inputs: its post-Relu mean is matched, its pre-Relu mean is not
    assert _channel_mean_error(reference, np.maximum(tapped, 0)) < 2e-3 * np.abs(reference).mean()


def test_merged_levels_leave_the_last_layer_matched_to_the_float_mean(chain, monkeypatch):
    """Two bands for three levels: conv3 must be measured with conv1 and conv2 both corrected.

    conv2 shares a band with conv1, so its stored output misses conv1's correction; the merged
    piece has to run again before conv3's band, or conv3's mean stays off by what conv1 moved.
    """
    model = chain[0]
    graph, float_model = _simulation_graph(model, monkeypatch)
    feeds = [{"x": CALIBRATION[i:i + 1]} for i in range(len(CALIBRATION))]
    before = _tap(graph.copy(), [], CALIBRATION)["y"]
    result = CorrectBias(float_model, feeds, BiasCorrectionConfig(measure="layer", max_bands=2))(graph)
    assert result.notes[0].startswith("3 biases corrected in 2 bands")
    reference = run_ort(float_model, {"x": CALIBRATION})[0]
    after = _tap(result.graph, [], CALIBRATION)["y"]
    assert _channel_mean_error(reference, after) < 0.01 * _channel_mean_error(reference, before)


def test_parallel_branches_share_a_level():
    x = gs.Variable("x", np.float32, ["n", 3, 8, 8])
    graph = gs.Graph(inputs=[x])
    dq = [graph.layer(op="DequantizeLinear", inputs=[gs.Constant(f"q{i}", np.zeros((4, 3, 1, 1), np.int8)),
                                                      gs.Constant(f"s{i}", np.ones(4, np.float32))],
                      outputs=[gs.Variable(f"w{i}")], attrs={"axis": 0})[0] for i in range(3)]
    left = graph.layer(op="Conv", name="left", inputs=[x, dq[0]], outputs=[gs.Variable("l")])[0]
    right = graph.layer(op="Conv", name="right", inputs=[x, dq[1]], outputs=[gs.Variable("r")])[0]
    total = graph.layer(op="Add", inputs=[left, right], outputs=[gs.Variable("a")])[0]
    graph.layer(op="Conv", name="after", inputs=[total, dq[2]], outputs=[gs.Variable("y")])
    graph.toposort()
    layers, refused = bias_correction._collect_layers(graph, {"l", "r", "y"})
    assert not refused
    bands = bias_correction._bands(graph, layers, max_bands=0)
    assert [[layer.node.name for layer in band] for band in bands] == [["left", "right"], ["after"]]
    assert len(bias_correction._bands(graph, layers, max_bands=1)) == 1


def test_gemm_without_bias_and_matmul_with_add_are_corrected():
    model = _gemm_model()
    flat_calibration, flat_held_out = CALIBRATION, HELD_OUT
    plain = quantize_with_result(model, flat_calibration, W4)
    corrected = quantize_with_result(model, flat_calibration, W4.with_(bias_correction=True))
    record = next(r for r in corrected.passes if r.name == "correct_bias")
    assert record.notes[0].startswith("2 biases corrected"), record.notes
    gemm = next(node for node in gs.import_onnx(corrected.model).nodes if node.op == "Gemm")
    assert len(gemm.inputs) == 3 and gemm.inputs[2].inputs[0].inputs[0].values.dtype == np.int32
    reference = run_ort(model, {"x": flat_held_out})[0]
    before, after = run_ort(plain.model, {"x": flat_held_out})[0], run_ort(corrected.model, {"x": flat_held_out})[0]
    assert sqnr_db(reference, after) > sqnr_db(reference, before)


def test_runs_after_block_reconstruction(chain):
    model = chain[0]
    config = W4.with_(fast=False, reconstruction=ReconstructionConfig(iterations=3), bias_correction=True)
    result = quantize_with_result(model, CALIBRATION, config)
    names = [r.name for r in result.passes]
    assert names.index("reconstruct_blocks") < names.index("correct_bias") < names.index("fold_weight_quantizers")
    reference = run_ort(model, {"x": HELD_OUT})[0]
    assert sqnr_db(reference, run_ort(result.model, {"x": HELD_OUT})[0]) > 10.0


def test_command_line_switches():
    parser = cli.build_parser()
    base = ["quantize", "m.onnx", "--calib", "c.npy", "-o", "q.onnx"]
    assert cli._config(parser.parse_args(base + ["--bias-correction"])).bias_correction is True
    assert cli._config(parser.parse_args(base + ["--no-bias-correction"])).bias_correction is False
    assert cli._config(parser.parse_args(base)).bias_correction is QuantConfig().bias_correction


def test_bias_correction_defaults_on_for_the_fast_recipe_only():
    assert QuantConfig(fast=True).corrects_bias and not QuantConfig(fast=False).corrects_bias
    assert not QuantConfig(fast=True, bias_correction=False).corrects_bias
    assert QuantConfig(fast=False, bias_correction=True).corrects_bias
    assert BiasCorrectionConfig().measure_after(reconstructed=True) == "layer"
    assert BiasCorrectionConfig().measure_after(reconstructed=False) == "activation"
    assert BiasCorrectionConfig(measure="activation").measure_after(reconstructed=True) == "activation"


def test_after_reconstruction_the_layer_means_are_matched(chain):
    """The MAE block loss matches medians and leaves each layer's mean shifted; after the scale search
    alone the mean after the Relu is the one to match."""
    config = QuantConfig(bias_correction=True, reconstruction=ReconstructionConfig(iterations=3))
    records = {r.name: r for r in quantize_with_result(chain[0], CALIBRATION, config).passes}
    assert "means matched at the layer outputs" in records["correct_bias"].notes[0]
    assert "correct_bias" not in {r.name for r in quantize_with_result(
        chain[0], CALIBRATION, config.with_(bias_correction=None)).passes}
    fast = {r.name: r for r in quantize_with_result(chain[0], CALIBRATION, config.with_(fast=True)).passes}
    assert "means matched at the activations" in fast["correct_bias"].notes[0]


def test_config_checks_its_fields():
    with pytest.raises(UserError):
        BiasCorrectionConfig(measure="output")
    with pytest.raises(UserError):
        BiasCorrectionConfig(max_samples=0)


def test_clip_activations_are_matched_after_their_bounds():
    """A Relu6-style Clip with constant bounds after a layer: the shift is solved after the Clip (this
    path once failed with a NameError on the bound constants)."""
    model = _chain_model()
    clip_bounds = [onnx.numpy_helper.from_array(np.float32(0.0), "low"), onnx.numpy_helper.from_array(np.float32(6.0), "high")]
    model.graph.initializer.extend(clip_bounds)
    relu = next(node for node in model.graph.node if node.name == "relu1")
    relu.op_type = "Clip"
    relu.input.extend(["low", "high"])
    plain = quantize_with_result(model, CALIBRATION, W4)
    corrected = quantize_with_result(model, CALIBRATION, W4.with_(bias_correction=True))
    assert any(record.name == "correct_bias" and record.modified for record in corrected.passes)
    reference = run_ort(model, {"x": HELD_OUT})[0]
    assert sqnr_db(reference, run_ort(corrected.model, {"x": HELD_OUT})[0]) > \
        sqnr_db(reference, run_ort(plain.model, {"x": HELD_OUT})[0])


@pytest.mark.parametrize("low, high", [(0.0, np.inf), (0.0, 6.0), (-np.inf, np.inf), (-1.0, 1.0)])
def test_the_clipped_mean_from_sorted_values_is_the_direct_one(low, high):
    """The bisection for the post-activation shift evaluates mean(clip(v + d)) from sorted values and
    running sums; it must give what a pass over every value gives, for Relu, Relu6, no clip and Clip."""
    generator = np.random.default_rng(3)
    values = generator.standard_normal((40, 2000)) * generator.uniform(0.1, 3.0, (40, 1))
    values[0] = 0.5                                    # ties: every value equal
    clipped_mean = _ClippedMean(values, low, high)
    for _ in range(6):
        shift = generator.normal(0.0, 2.0, 40)
        direct = np.clip(values + shift[:, None], low, high).mean(axis=1)
        np.testing.assert_allclose(clipped_mean(shift), direct, rtol=1e-9, atol=1e-9)


def _misleading_shift() -> tuple[onnx.ModelProto, gs.Graph]:
    """A float conv and a quantized graph whose conv carries an offset d that a later Sub removes.

    The conv output's mean is off by d, so matching it moves the bias; the graph's output, exact
    before, is then off by d: a correction that matches every mean and makes the outputs worse.
    """
    weight = np.round(rng.normal(0, 0.3, (4, 3, 1, 1)) * 8).astype(np.float32) / 8   # on the 4-bit grid below
    bias, offset = rng.normal(0, 0.1, 4).astype(np.float32), np.full(4, 0.5, np.float32)
    float_model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
                              helper.make_node("Identity", ["c"], ["y"])],
                             {"x": ["n", 3, 12, 12]}, {"y": ["n", 4, 12, 12]}, {"w": weight, "b": bias})
    x = gs.Variable("x", np.float32, ["n", 3, 12, 12])
    graph = gs.Graph(inputs=[x], opset=13)
    dequantized = graph.layer(op="DequantizeLinear", inputs=[gs.Constant("wq", (weight * 8).astype(np.int8)),
                                                               gs.Constant("ws", np.full(4, 1 / 8, np.float32)),
                                                               gs.Constant("wz", np.zeros(4, np.int8))],
                              outputs=[gs.Variable("wd")], attrs={"axis": 0})[0]
    conv = graph.layer(op="Conv", name="conv", inputs=[x, dequantized, gs.Constant("bq", bias + offset)],
                       outputs=[gs.Variable("c", np.float32)])[0]
    graph.outputs = graph.layer(op="Sub", inputs=[conv, gs.Constant("d", offset.reshape(1, 4, 1, 1))],
                                outputs=[gs.Variable("y", np.float32)])
    return float_model, graph


def test_guard_hands_back_the_graph_when_the_correction_moves_the_outputs_away():
    float_model, graph = _misleading_shift()
    feeds = [{"x": CALIBRATION[i:i + 8]} for i in range(0, len(CALIBRATION), 8)]
    exact = _tap(graph.copy(), [], HELD_OUT)["y"]
    reference = run_ort(float_model, {"x": HELD_OUT})[0]
    assert sqnr_db(reference, exact) > 60.0

    unguarded = CorrectBias(float_model, feeds, BiasCorrectionConfig(measure="layer", guard=False))(graph.copy())
    assert unguarded.modified and sqnr_db(reference, _tap(unguarded.graph, [], HELD_OUT)["y"]) < 20.0

    guarded = CorrectBias(float_model, feeds, BiasCorrectionConfig(measure="layer"))(graph.copy())
    assert not guarded.modified
    assert guarded.notes[-1].startswith("bias correction undone: output SQNR")
    np.testing.assert_array_equal(_tap(guarded.graph, [], HELD_OUT)["y"], exact)


def test_guard_keeps_a_correction_that_brings_the_outputs_closer(chain):
    """The fast recipe's own correction (guarded) is the one asked for by name (not guarded) here."""
    model, plain, corrected = chain
    default = quantize_with_result(model, CALIBRATION, W4.with_(bias_correction=None))
    record = next(r for r in default.passes if r.name == "correct_bias")
    assert record.modified and record.notes[-1].startswith("bias correction kept: output SQNR")
    reference = run_ort(model, {"x": HELD_OUT})[0]
    assert sqnr_db(reference, run_ort(default.model, {"x": HELD_OUT})[0]) > \
        sqnr_db(reference, run_ort(plain.model, {"x": HELD_OUT})[0]) + 1.0
    named = next(r for r in corrected.passes if r.name == "correct_bias")
    assert not any(note.startswith("bias correction kept") for note in named.notes)
