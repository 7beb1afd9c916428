"""Recipes: files load into QuantConfig key for key, flags override them, overrides reach single nodes."""
from __future__ import annotations

import json
import tomllib

import numpy as np
import onnx
import pytest

from onnxrepq.api import quantize_with_result
from onnxrepq.calibrate.images import ImagePreprocess
from onnxrepq.cli import main
from onnxrepq.config import (CalibrationConfig, NodeOverride, QuantConfig, config_from_dict, load_recipe,
                             recipe_toml)
from onnxrepq.errors import UserError
from tests.models_for_tests import structured_images
from tests.report.test_report import three_layer_model

RECIPE = """
weight_bits = 6
scale_search = "percentile"
percentile = 99.9
keep_float = ["Softmax"]
fast = true

[calibration]
max_samples = 32
[calibration.images]
size = [48, 320]
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
channel_order = "BGR"

[reconstruction]
iterations = 10

[[override]]
match = "*Gemm*"
keep_float = true

[[override]]
match = "Conv"
weight_bits = 4
scale_search = "minmax"
"""

EXPECTED = QuantConfig(
    weight_bits=6, scale_search="percentile", percentile=99.9, keep_float=("Softmax",), fast=True,
    calibration=CalibrationConfig(max_samples=32, images=ImagePreprocess(
        size=(48, 320), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channel_order="BGR")),
    reconstruction=QuantConfig().reconstruction.__class__(iterations=10),
    overrides=(NodeOverride("*Gemm*", keep_float=True), NodeOverride("Conv", weight_bits=4, scale_search="minmax")),
)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(three_layer_model().SerializeToString())
    np.save(tmp_path / "calib.npy", structured_images(6, seed=50))
    (tmp_path / "recipe.toml").write_text(RECIPE)
    return tmp_path


def test_toml_recipe_loads_field_for_field(files):
    assert load_recipe(files / "recipe.toml") == EXPECTED


def test_yaml_recipe_loads_the_same(tmp_path):
    import yaml

    data = tomllib.loads(RECIPE)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert load_recipe(tmp_path / "recipe.yaml") == EXPECTED


@pytest.mark.parametrize("config", [QuantConfig(), EXPECTED])
def test_toml_and_json_round_trip(config, tmp_path):
    (tmp_path / "r.toml").write_text(recipe_toml(config))
    assert load_recipe(tmp_path / "r.toml") == config
    assert config_from_dict(json.loads(json.dumps(__import__("dataclasses").asdict(config)))) == config


@pytest.mark.parametrize("text, key", [("foo = 1", "'foo'"), ("[calibration]\nbins = 3", "'calibration.bins'"),
                                       ("[[override]]\nmatch = 'a'\nbits = 4", "'overrides[0].bits'")])
def test_unknown_key_is_a_usage_error_naming_it(text, key, files, capsys):
    (files / "bad.toml").write_text(text)
    with pytest.raises(UserError, match="unknown recipe key"):
        load_recipe(files / "bad.toml")
    assert main(["quantize", "--recipe", str(files / "bad.toml"), "--print-recipe"]) == 2
    assert key in capsys.readouterr().err


def test_wrong_types_are_usage_errors(files):
    for text in ("weight_bits = 'eight'", "fast = 1", "keep_float = 'Conv'", "target = 'gpu'",
                 "[reconstruction]\nactivation_step_floor = -0.5",
                 "weight_range = 'unsigned'\ntarget = 'tensorrt'"):   # TensorRT takes int8 weights only
        (files / "bad.toml").write_text(text)
        with pytest.raises(UserError):
            load_recipe(files / "bad.toml")


def test_print_recipe_loads_back_with_flags_over_the_recipe(files, capsys):
    assert main(["quantize", "--recipe", str(files / "recipe.toml"), "--wbits", "5", "--seed", "3",
                 "--keep-float", "Relu", "--calib-samples", "8", "--image-size", "32", "64", "--print-recipe"]) == 0
    (files / "printed.toml").write_text(capsys.readouterr().out)
    images = EXPECTED.calibration.images.__class__(size=(32, 64), mean=(0.5,) * 3, std=(0.5,) * 3,
                                                   channel_order="BGR")
    assert load_recipe(files / "printed.toml") == EXPECTED.with_(
        weight_bits=5, seed=3, keep_float=("Softmax", "Relu"),
        calibration=CalibrationConfig(max_samples=8, images=images))


def weight_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Anchor node name -> element type of the initializer behind its weight (through a DequantizeLinear)."""
    inits = {init.name: init.data_type for init in model.graph.initializer}
    producers = {node.output[0]: node for node in model.graph.node}
    dtypes = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight = node.input[1]
            dtypes[node.name] = inits.get(producers[weight].input[0]) if weight in producers else inits[weight]
    return dtypes


def test_overrides_keep_float_and_narrow_weights(files):
    result = quantize_with_result(str(files / "model.onnx"), str(files / "calib.npy"), EXPECTED)
    dtypes = weight_dtypes(result.model)
    gemm = [node.name for node in result.model.graph.node if node.op_type == "Gemm"]
    assert len(gemm) == 1 and dtypes[gemm[0]] == onnx.TensorProto.FLOAT
    rows = {row["op"]: row for row in result.layers if "weight_bits" in row}
    assert set(rows) == {"Conv"} and rows["Conv"]["weight_bits"] == 4
    assert all(row["input_scale_search"] == "minmax" for row in result.layers if "weight_bits" in row)
    int8 = [name for name, dtype in dtypes.items() if dtype == onnx.TensorProto.INT8]
    assert len(int8) == 2
    folded = {init.name: onnx.numpy_helper.to_array(init) for init in result.model.graph.initializer
              if init.data_type == onnx.TensorProto.INT8 and init.dims and len(init.dims) == 4}
    assert folded and all(np.abs(w).max() <= 7 for w in folded.values())  # the 4-bit grid [-7, 7]


def test_per_node_weight_bits_hold_under_reconstruction(files):
    """Per-node widths are accepted by the reconstruction recipe and the emitted weights stay on the override's grid."""
    result = quantize_with_result(str(files / "model.onnx"), str(files / "calib.npy"), EXPECTED.with_(fast=False))
    assert any(record.name == "reconstruct_blocks" and record.modified for record in result.passes)
    rows = {row["op"]: row for row in result.layers if "weight_bits" in row}
    assert rows["Conv"]["weight_bits"] == 4
    folded = [onnx.numpy_helper.to_array(init) for init in result.model.graph.initializer
              if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4]
    assert folded and all(np.abs(w).max() <= 7 for w in folded)


def test_metadata_is_complete_and_the_recipe_round_trips(files):
    config = EXPECTED.with_(overrides=EXPECTED.overrides[:1])
    model = quantize_with_result(str(files / "model.onnx"), str(files / "calib.npy"), config).model
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxrepq.version"] and len(props["onnxrepq.calibration_sha256"]) == 16
    assert props["onnxrepq.calibration_samples"] == "6"
    assert config_from_dict(json.loads(props["onnxrepq.recipe"])) == config
    layers = json.loads(props["onnxrepq.layers"])
    assert [(row["op"], row.get("weight_bits"), row.get("float")) for row in layers] == [
        ("Conv", 6, None), ("Conv", 6, None), ("Gemm", None, "kept in float by the recipe")]
