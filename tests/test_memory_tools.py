"""tools/large_model.py and tools/memory_scaling.py at a tiny size, so their code paths cannot rot."""
import os
import sys

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tools` lives at the root

from tools import large_model, memory_scaling  # noqa: E402
from tests.models_for_tests import conv_bn_model, structured_images  # noqa: E402


def test_large_model_builds_quantizes_and_compares_a_small_one(tmp_path):
    result = large_model.run(tmp_path, hidden=64, layers=2, samples=4, extra_args=["--weight-scale-search", "minmax"])
    assert result.weight_bytes == 2 * 64 * 64 * 4
    assert result.input_bytes > result.weight_bytes  # graph + data file
    assert result.output_files[0] == "quantized.onnx" and result.output_files[1].endswith(".data")
    assert result.sqnr_db > 20 and result.wall_s > 0 and result.peak_rss_mb > 50
    assert "peak RSS" in large_model.report(result, 64, 2)


def test_grown_set_repeats_with_noise():
    base = structured_images(3, seed=1)
    grown = memory_scaling.grown_set(base, 7)
    assert grown.shape == (7, *base.shape[1:]) and grown.dtype == base.dtype
    np.testing.assert_array_equal(grown[:3], base)
    assert 0 < np.abs(grown[3:6] - base).max() < 0.1 * base.std()


def test_memory_scaling_reads_every_sample_past_the_default_limit(tmp_path):
    onnx.save(conv_bn_model(channels=4, size=16), str(tmp_path / "model.onnx"))
    rows = memory_scaling.scaling(str(tmp_path / "model.onnx"), structured_images(8, seed=2), counts=(300,),
                                  extra_args=["--scale-search", "minmax"], folder=str(tmp_path))
    assert [row.samples for row in rows] == [300] and rows[0].peak_rss_mb > 50
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}
    assert metadata["onnxrepq.calibration_samples"] == "300"  # the recipe lifted max_samples from 256
    assert "| 300 |" in memory_scaling.markdown_table("tiny", rows)
