"""Fast checks of the bench's data and metrics (tools/ocr_data.py, tools/bench_lib/metrics.py)."""
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tools` lives at the root

from tools import ocr_data  # noqa: E402
from tools.bench_lib import methods, metrics, tasks  # noqa: E402
from tools.bench_lib.calib_files import read_calibration, write_calibration  # noqa: E402


def test_rec_lines_are_deterministic_per_split():
    first, first_labels = ocr_data.rec_split("calib", 4)
    again, again_labels = ocr_data.rec_split("calib", 4)
    other, other_labels = ocr_data.rec_split("eval", 4)
    assert first.shape == (4, 3, 48, 320) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert first_labels == again_labels
    assert first_labels != other_labels and not np.array_equal(first, other)


def test_rec_preprocessing_range_and_right_padding():
    images, _ = ocr_data.rec_split("eval", 3)
    assert images.min() >= -1.0 and images.max() <= 1.0
    wide = ocr_data.resize_norm_line(np.full((24, 48, 3), 255, np.uint8), 320)  # aspect 2 -> 96 px wide
    assert np.all(wide[:, :, :96] == 1.0) and np.all(wide[:, :, 96:] == 0.0)


def test_det_pages_are_deterministic_and_normalized():
    first = ocr_data.det_split("calib", 2, size=64)
    np.testing.assert_array_equal(first, ocr_data.det_split("calib", 2, size=64))
    assert not np.array_equal(first, ocr_data.det_split("eval", 2, size=64))
    assert first.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError):
        ocr_data.det_split("calib", 1, size=50)


def test_cls_labels_balanced_and_deterministic():
    images, labels = ocr_data.cls_split("eval", 6)
    assert images.shape == (6, 3, 48, 192) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(images, ocr_data.cls_split("eval", 6)[0])


def test_ctc_greedy_decode_collapses_repeats_and_drops_blank():
    characters = ["a", "b", " "]
    # time steps: a a blank a b b blank space  -> "aab "
    path = [1, 1, 0, 1, 2, 2, 0, 3]
    probabilities = np.eye(4, dtype=np.float32)[path] * 0.9 + 0.025
    assert ocr_data.ctc_greedy_decode(probabilities, characters) == "aab "


@pytest.mark.parametrize("source,target,distance", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0),
])
def test_levenshtein_known_pairs(source, target, distance):
    assert metrics.levenshtein(source, target) == distance


def test_character_error_rate_and_exact_match():
    assert metrics.character_error_rate(["kitten", "ab"], ["sitting", "ab"]) == pytest.approx(3 / 9)
    assert metrics.exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5


def test_mean_mask_iou_on_constructed_maps():
    reference = np.zeros((2, 1, 4, 4), np.float32)
    other = np.zeros_like(reference)
    reference[0, 0, :2, :] = 0.9  # 8 pixels
    other[0, 0, :1, :] = 0.9      # 4 of them -> IoU 0.5
    other[0, 0, 3, 0] = 0.2       # below threshold: ignored
    # image 1: both empty -> full agreement
    assert metrics.mean_mask_iou(reference, other, threshold=0.3) == pytest.approx((0.5 + 1.0) / 2)


def test_sqnr_db():
    reference = np.array([3.0, 4.0])  # power 25
    assert metrics.sqnr_db(reference, reference + np.array([0.5, 0.0])) == pytest.approx(10 * np.log10(25 / 0.25))
    assert metrics.sqnr_db(reference, reference) == float("inf")


def test_int8_weight_fraction_counts_elements():
    quantized = numpy_helper.from_array(np.ones((4, 2), np.int8), "w_q")
    float_weight = numpy_helper.from_array(np.ones((2, 12), np.float32), "w2")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "scale"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])],
                              [quantized, float_weight, scale])
    assert metrics.int8_weight_fraction(helper.make_model(graph)) == pytest.approx(8 / (8 + 24))


def test_calibration_files_round_trip(tmp_path):
    single = {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    path = write_calibration(single, str(tmp_path / "one"))
    assert path.endswith(".npy")
    np.testing.assert_array_equal(read_calibration(path, ["x"])["x"], single["x"])
    double = {"a": np.zeros((2, 1), np.float32), "b": np.ones((2, 3), np.float32)}
    path = write_calibration(double, str(tmp_path / "two"))
    assert path.endswith(".npz")
    assert {k: v.shape for k, v in read_calibration(path, ["a", "b"]).items()} == {"a": (2, 1), "b": (2, 3)}


def test_failing_quantizer_is_recorded_not_raised(tmp_path):
    broken = methods.Method("broken", ("-c", "print('loading'); raise SystemExit('ValueError: bad model')"))
    stats = methods.run_quantizer(broken, "m.onnx", str(tmp_path / "out.onnx"), "c.npy", (60, 4000),
                                  str(tmp_path / "log.txt"))
    assert stats["returncode"] == 1 and stats["error"] == "exit 1: ValueError: bad model"
    assert stats["peak_rss_mb"] > 0


def test_fp32_rec_reads_rendered_lines():
    """Validates preprocessing and decoding end to end: the real model must read most lines exactly."""
    from tools.bench_lib import runtime
    path = tasks.rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")
    assert path is not None, "the real-model tests need `pip install --no-deps rapidocr-onnxruntime` (.ci/run does it)"
    characters = ocr_data.rec_characters(onnx.load(path, load_external_data=False))
    images, labels = ocr_data.rec_split("eval", 20)
    outputs = runtime.run_batches(runtime.make_session(path), {"x": images}, 10)
    predictions = [ocr_data.ctc_greedy_decode(o, characters).strip() for o in outputs]
    assert metrics.exact_match(predictions, labels) >= 0.5


def test_ablate_reconstruction_rows_are_finite():
    """tools/ablate_reconstruction.py's core on a tiny net: one row per variant, finite scores, a table row."""
    from tests.models_for_tests import conv_bn_model, run_ort, structured_images
    from tools import ablate_reconstruction as ablate
    model = conv_bn_model(channels=4, size=8)
    images = structured_images(24, seed=3, size=8)
    labels = np.argmax(run_ort(model, {"x": images[8:]})[0].reshape(16, -1), axis=1)
    rows = ablate.ablate_model("tiny", model, {"x": images[:8]}, {"x": images[8:]}, labels,
                               settings={(4, 8): ["fast", "base"]}, iterations=3)
    assert [(r["bits"], r["variant"]) for r in rows] == [("W4A8", "fast"), ("W4A8", "base")]
    assert all(np.isfinite([r["top1"], r["sqnr_db"], r["seconds"], r["fp32_top1"]]).all() for r in rows)
    assert rows[0]["fp32_top1"] == 100.0 and rows[1]["blocks"].startswith("1 blocks")
    table = ablate.markdown(rows)
    assert "| tiny (100.00) | W4A8 | " in table and table.count("| tiny") == 1


def test_narrow_activation_probe_holds_the_grid_and_changes_nothing_else():
    """tools/narrow_activations.py: a narrowed quantizer emits at most 2^bits levels over its 8-bit range;
    narrowing none gives the 8-bit model's outputs bit for bit."""
    import onnxrepq
    from onnxrepq.config import QuantConfig
    from tests.models_for_tests import conv_bn_model, run_ort, structured_images
    from tools.narrow_activations import activation_quantizers, narrowed

    model = onnxrepq.quantize(conv_bn_model(channels=4, size=16), structured_images(8, seed=1), QuantConfig(fast=True))
    feeds = {"x": structured_images(4, seed=2) * 3}
    quantizers = activation_quantizers(model)
    assert quantizers and all(q.op_type == "QuantizeLinear" for q in quantizers)
    np.testing.assert_array_equal(run_ort(narrowed(model, set(), 6), feeds)[0], run_ort(model, feeds)[0])

    probe = narrowed(model, {quantizers[0].name}, 6)
    probe.graph.output.append(helper.make_tensor_value_info(f"{quantizers[0].name}__narrow_clipped", TensorProto.UINT8,
                                                            None))
    levels = run_ort(probe, feeds, optimize=False)[-1]
    assert len(np.unique(levels)) <= 64 and levels.max() <= 63


def test_time_first_agreement_splits_concatenated_lines():
    """ddddocr's [T, 1, classes] outputs arrive concatenated on axis 0; each T-step run is one line."""
    def line(path):
        return np.eye(4, dtype=np.float32)[path][:, None, :]  # [T, 1, classes]

    assert tasks.ctc_greedy_classes(line([1, 1, 0, 1, 2, 2])[:, 0]) == (1, 1, 2)
    reference = np.concatenate([line([1, 1, 0, 1]), line([2, 0, 3, 3]), line([0, 0, 0, 0])])
    # line 0: same reading by another path; line 1: reads (2, 3, 1); line 2: still empty
    outputs = np.concatenate([line([1, 0, 1, 1]), line([2, 3, 3, 1]), line([0, 0, 0, 0])])
    assert tasks.time_first_agreement(outputs, reference, 3) == pytest.approx(2 / 3)
    assert tasks.time_first_agreement(reference, reference, 3) == 1.0


def test_grey_lines_are_what_ddddocr_feeds_its_recognizer():
    """rec's [-1, 1] RGB lines become grey [0, 1] at 64 x 427 (runs without ddddocr installed, as in CI)."""
    images, _ = ocr_data.rec_split("eval", 3)
    lines = tasks.grey_lines(images)
    assert lines.shape == (3, 1, 64, 427) and lines.dtype == np.float32
    assert lines.min() >= 0.0 and lines.max() <= 1.0
    # a uniform image stays that grey: white (1 in rec's range) -> 1.0, mid grey (0) -> 0.5
    flat = tasks.grey_lines(np.stack([np.ones_like(images[0]), np.zeros_like(images[0])]))
    assert np.allclose(flat[0], 1.0) and np.allclose(flat[1], 0.5)


def test_variant_changes_split_between_configs_and_refuse_unknown_fields():
    from tools.variant import parse_changes
    quant, rec = parse_changes(["bias_correction=True", "rec.loss='mse'", "rec.iterations=200"])
    assert quant == {"bias_correction": True} and rec == {"loss": "mse", "iterations": 200}
    for bad in (["rec.no_such_field=1"], ["seed=3"], ["rec.loss=mse"], ["iterations"]):
        with pytest.raises(SystemExit):
            parse_changes(bad)


def test_variant_takes_field_changes_after_the_options():
    from tools.variant import parse_arguments
    args = parse_arguments(["ddddocr", "qdrop", "--seed", "1", "--out", "rows.jsonl", "rec.qdrop=0.5", "rec.iterations=50"])
    assert (args.task, args.name, args.seed, args.out) == ("ddddocr", "qdrop", 1, "rows.jsonl")
    assert args.changes == ["rec.qdrop=0.5", "rec.iterations=50"]


def test_ablate_reconstruction_variants_pick_columns():
    from tools import ablate_reconstruction as ablate
    assert ablate.chosen_settings("") == ablate.SETTINGS
    assert ablate.chosen_settings("base,affine") == {(8, 8): ["base", "affine"], (4, 8): ["base", "affine"],
                                                     (6, 6): ["base", "affine"]}
    # base is MAE at W8A8 and MSE below, so each setting runs the other loss as its ablation
    assert ablate.chosen_settings("mse,mae") == {(8, 8): ["mse"], (4, 8): ["mae"], (6, 6): ["mae"]}
    with pytest.raises(SystemExit, match="unknown variants: joint"):
        ablate.chosen_settings("joint")
    # every variant's changes are fields the config takes, with values it accepts (as a recipe file checks them)
    from onnxrepq.config import config_from_dict
    for variant in ablate.VARIANTS:
        config_from_dict(variant.changes, ablate.ReconstructionConfig)


def test_variant_scores_a_zoo_model_and_names_what_it_knows_when_asked_for_another():
    from tools.bench_lib.tasks import Sizes
    from tools.variant import make_task
    task = make_task("zoo/repvgg", Sizes(zoo_eval=8))
    assert task.model_path.endswith(os.path.join("models", "repvgg", "model.onnx"))
    assert len(task.eval_inputs[next(iter(task.eval_inputs))]) == 8 and task.primary_metric == "top1"
    for unknown in ("zoo/no-such-model", "resnet"):
        with pytest.raises(SystemExit, match="unknown task .* or zoo/NAME"):
            make_task(unknown, Sizes(zoo_eval=8))
