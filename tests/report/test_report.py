"""report.json and report.html: one row per quantized layer, plausible per-layer SQNR, a page that opens offline."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxrepq.cli import main
from tests.models_for_tests import make_model, structured_images, weights


def three_layer_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    inits = {"w1": weights(8, 3, 3, 3), "b1": weights(8), "w2": weights(8, 8, 3, 3, scale=0.2), "b2": weights(8),
             "w3": weights(5, 8), "b3": weights(5)}
    return make_model(nodes, {"x": ["n", 3, 16, 16]}, {"y": ["n", 5]}, inits)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    (folder / "model.onnx").write_bytes(three_layer_model().SerializeToString())
    np.save(folder / "calib.npy", structured_images(12, seed=40))
    args = ["quantize", str(folder / "model.onnx"), "-o", str(folder / "q.onnx"), "--calib", str(folder / "calib.npy"),
            "--fast", "--quiet", "--report", str(folder / "rep")]
    assert main(args) == 0
    report = json.loads((folder / "rep" / "report.json").read_text())
    return folder, report


def int8_weight_nodes(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul whose weight comes from a DequantizeLinear of an int8 initializer."""
    int8 = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
    dequantized = {node.output[0] for node in model.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in int8}
    return sum(node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in dequantized
               for node in model.graph.node)


def test_one_row_per_int8_layer(reported):
    folder, report = reported
    quantized = [row for row in report["layers"] if "weight_bits" in row]
    assert len(quantized) == int8_weight_nodes(onnx.load(str(folder / "q.onnx"))) == 3
    assert report["model"]["quantized_layers"] == 3 and report["model"]["int8_weight_fraction"] == 1.0
    assert [row["op"] for row in quantized] == ["Conv", "Conv", "Gemm"]


def test_sqnr_values_are_finite_and_plausible(reported):
    _, report = reported
    for row in report["layers"]:
        assert row["sqnr_db"] is not None and 15.0 < row["sqnr_db"] < 80.0, row
        assert row["weight_min"] < 0 < row["weight_max"] and len(row["channel_absmax"]) in (8, 5)
        assert row["input_scale"] > 0 and sum(row["input_histogram"]["counts"]) > 0
    output = report["model"]["outputs"][0]
    assert 15.0 < output["sqnr_db"] < 80.0 and output["cosine"] > 0.99
    assert report["model"]["samples"] == 12


def test_report_carries_recipe_version_hash_and_timings(reported):
    _, report = reported
    assert report["recipe"]["fast"] is True and report["version"]
    assert len(report["calibration"]["sha256"]) == 16 and report["calibration"]["samples"] == 12
    assert {"normalize", "calibrate", "search", "report"} <= set(report["timings"])


def test_html_is_self_contained(reported):
    folder, _ = reported
    page = (folder / "rep" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("<svg") >= 1 + 3  # the SQNR chart and at least one range chart per layer
    assert "weight_bits = 8" in page  # the recipe


def test_kept_float_layers_are_rows_with_a_reason(tmp_path):
    (tmp_path / "model.onnx").write_bytes(three_layer_model().SerializeToString())
    np.save(tmp_path / "calib.npy", structured_images(4, seed=41))
    assert main(["quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "calib.npy"), "--fast", "--quiet", "--keep-float", "Gemm",
                 "--report", str(tmp_path / "rep")]) == 0
    rows = json.loads((tmp_path / "rep" / "report.json").read_text())["layers"]
    assert [("weight_bits" in row, row["op"]) for row in rows] == [(True, "Conv"), (True, "Conv"), (False, "Gemm")]
    assert rows[2]["float"] == "kept in float by the recipe"
