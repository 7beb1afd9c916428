"""Outlier-aware activation ranges end to end: quantize() with and without them, scored through onnxruntime."""
from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import helper

from onnxrepq.api import quantize_with_result
from onnxrepq.config import QuantConfig
from tests.models_for_tests import make_model, run_ort, sqnr_db

CHANNELS, HEAVY = 64, 5


def heavy_channel_net() -> "onnx.ModelProto":
    """x -> Conv 1x1 (near identity) -> Relu -> Conv 1x1 -> y, where output 0 reads mostly channel HEAVY.

    One channel carrying the signal a later layer needs is what re-parameterized nets do (RepAPQ);
    the other outputs read the bulk channels, so stretching the grid for everyone has a cost too.
    """
    generator = np.random.default_rng(11)
    first = (np.eye(CHANNELS) + 0.02 * generator.standard_normal((CHANNELS, CHANNELS))).astype(np.float32)
    second = (0.3 * generator.standard_normal((4, CHANNELS))).astype(np.float32)
    second[0] = 0.02
    second[0, HEAVY] = 1.0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    return make_model(nodes, {"x": ["N", CHANNELS, 8, 8]}, ["y"],
                      {"w1": first[:, :, None, None], "w2": second[:, :, None, None]})


def inputs(count: int, seed: int, heavy: bool) -> np.ndarray:
    """|N(0, 1)| channels; with ``heavy``, channel HEAVY is |Laplace(0, 6)|: about 13x the others at the max."""
    generator = np.random.default_rng(seed)
    values = np.abs(generator.standard_normal((count, CHANNELS, 8, 8)))
    if heavy:
        values[:, HEAVY] = np.abs(generator.laplace(0, 6.0, (count, 8, 8)))
    return values.astype(np.float32)


def quantized_sqnr(config: QuantConfig, heavy: bool) -> tuple[float, list[dict]]:
    model = heavy_channel_net()
    result = quantize_with_result(model, {"x": inputs(32, 0, heavy)}, config)
    held_out = {"x": inputs(16, 1, heavy)}
    return sqnr_db(run_ort(model, held_out)[0], run_ort(result.model, held_out)[0]), result.layers


@pytest.mark.parametrize("config, gain", [(QuantConfig(scale_search="mae"), 2.0),
                                          (QuantConfig(activation_bits=4, fast=True), 1.0)],
                         ids=["mae-a8", "mse-a4-fast"])
def test_outlier_ranges_raise_output_sqnr_where_the_search_clips_the_signal_channel(config, gain):
    """MAE, and MSE on a 4-bit grid, clip the heavy channel the output reads; the cover keeps its
    median-sample maximum. Measured: mae-a8 14.8 -> 21.4 dB, mse-a4 with `--fast` 11.8 -> 13.8 dB (mse-a8
    keeps the channel by itself: 29.8 dB either way). The 4-bit case runs without reconstruction, whose
    MSE loss below 8 bits recovers part of the clipped channel by itself (12.8 -> 13.6 dB with it)."""
    plain, _ = quantized_sqnr(config, heavy=True)
    aware, layers = quantized_sqnr(config.with_(outlier_aware_ranges=True), heavy=True)
    assert aware > plain + gain
    moved = [row["input_outlier_range"] for row in layers if "input_outlier_range" in row]
    assert moved and all(new[1] > old[1] for old, new in moved)


def test_outlier_ranges_change_nothing_without_outlier_channels():
    """No channel stands 8x above the median: the same model comes out, byte for byte, and no row says moved."""
    config = QuantConfig(scale_search="mae")
    plain = quantize_with_result(heavy_channel_net(), {"x": inputs(32, 0, heavy=False)}, config)
    aware = quantize_with_result(heavy_channel_net(), {"x": inputs(32, 0, heavy=False)},
                                 config.with_(outlier_aware_ranges=True))
    assert [i.SerializeToString() for i in plain.model.graph.initializer] == \
        [i.SerializeToString() for i in aware.model.graph.initializer]
    assert not any("input_outlier_range" in row for row in aware.layers)


def test_cli_flags_set_the_recipe_field_both_ways(tmp_path):
    """--outlier-ranges / --no-outlier-ranges override the recipe; neither keeps the recipe's value."""
    from onnxrepq.cli import _config, build_parser

    recipe = tmp_path / "on.toml"
    recipe.write_text("outlier_aware_ranges = true\n")

    def parsed(*flags):
        return _config(build_parser().parse_args(["quantize", *flags])).outlier_aware_ranges

    assert parsed("--outlier-ranges") is True
    assert parsed("--recipe", str(recipe), "--no-outlier-ranges") is False
    assert parsed("--recipe", str(recipe)) is True
    assert parsed() is QuantConfig().outlier_aware_ranges
