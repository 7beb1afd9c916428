"""Fast checks of tools/sweep.py: which models it finds, and that a failing model is a row, not a crash."""
import argparse
import os
import sys

import numpy as np
import pytest
from onnx import helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tools` lives at the root

from tools import sweep  # noqa: E402
from tools.bench_lib import methods, tasks  # noqa: E402
from tests.models_for_tests import make_model  # noqa: E402

ZOO_FAMILIES = ("acnet", "dbb", "mobileone", "qarepvgg", "repvgg")
FAST = argparse.Namespace(calib_samples=2, eval_samples=1, latency_runs=1, timeout=120.0, memory_cap_mb=4000.0)


@pytest.fixture(scope="module")
def discovered():
    return [os.path.realpath(path) for path in sweep.discover_models()]


def test_discovery_finds_the_zoo(discovered):
    for family in ZOO_FAMILIES:
        assert os.path.realpath(os.path.join(methods.REPO_ROOT, "models", family, "model.onnx")) in discovered
    assert not any(path.endswith("deploy.onnx") for path in discovered)


def test_discovery_finds_the_rapidocr_models(discovered):
    bundled = [tasks.rapidocr_model(name) for name in ("ch_PP-OCRv4_rec_infer.onnx", "ch_PP-OCRv4_det_infer.onnx",
                                                       "ch_ppocr_mobile_v2.0_cls_infer.onnx")]
    if None in bundled:  # not installed: nothing of it may be claimed
        assert not any("rapidocr_onnxruntime" in path for path in discovered)
    else:
        assert {os.path.realpath(path) for path in bundled} <= set(discovered)


def test_discovery_skips_test_data_folders(tmp_path):
    for relative in ("pkg/models/a.onnx", "pkg/test/data/b.onnx", "pkg/tests/c.onnx", "pkg/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found = sweep.discover_models([str(tmp_path)], repo_root=str(tmp_path))
    assert found == [str(tmp_path / "pkg" / "models" / "a.onnx")]


def test_dynamic_dims_become_batch_one_and_the_fallback_size():
    assert sweep.concrete_shape(["batch", 3, "h", "w"], (64, 320)) == (1, 3, 64, 320)
    assert sweep.concrete_shape([3, 4, 5], (64, 320)) == (3, 4, 5)


def test_corrupt_model_is_a_failed_row_with_one_line_reason(tmp_path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    row = sweep.sweep_model(str(model), str(tmp_path), FAST)
    assert not row.succeeded and row.error.startswith("float model: ") and "\n" not in row.error
    assert "**failed**" in sweep.markdown_table([row])


def refused_model():
    """Runs in onnxruntime, but its IR version 3 wants the initializer listed as a graph input: the CLI exits 2."""
    model = make_model([helper.make_node("Mul", ["x", "w"], ["y"])], {"x": [3, 2]}, {"y": [3, 2]},
                       {"w": np.ones((3, 2), np.float32)})
    model.ir_version = 3
    model.opset_import[0].version = 7
    return model


def test_model_the_quantizer_refuses_is_a_failed_row_with_its_exit_code(tmp_path):
    path = tmp_path / "old_ir.onnx"
    path.write_bytes(refused_model().SerializeToString())
    row = sweep.sweep_model(str(path), str(tmp_path), FAST)
    assert row.exit_code == 2 and row.error.startswith("exit 2: onnxrepq: error:") and "\n" not in row.error
    assert row.sqnr_db is None and "**failed**" in sweep.markdown_table([row])


def test_quantizer_child_failure_is_recorded_with_exit_code_and_one_line(tmp_path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(b"not a model at all")
    calibration = tmp_path / "calib.npy"
    np.save(calibration, np.zeros((2, 3, 8, 8), np.float32))
    stats = sweep.quantize_in_child(str(model), str(tmp_path / "q.onnx"), str(calibration), 60.0, 4000.0)
    assert stats["returncode"] == 2
    assert stats["error"].startswith("exit 2: onnxrepq: error:") and "\n" not in stats["error"]
    assert not (tmp_path / "q.onnx").exists()
