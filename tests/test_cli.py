"""The command line in-process: exit codes, one-line errors, and no output file on failure."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxrepq.cli import main
from tests.models_for_tests import conv_bn_model, run_ort, structured_images


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "model.onnx"
    model.write_bytes(conv_bn_model(channels=4, size=16).SerializeToString())
    np.save(folder / "calib.npy", structured_images(16, seed=20))
    np.save(folder / "data.npy", structured_images(8, seed=21))
    return folder


@pytest.fixture(scope="module")
def quantized(files):
    before = sha256(files / "model.onnx")
    code = main(["quantize", str(files / "model.onnx"), "-o", str(files / "q.onnx"),
                 "--calib", str(files / "calib.npy"), "--quiet"])
    return code, before, sha256(files / "model.onnx")


def test_quantize_succeeds_and_leaves_the_input_alone(files, quantized):
    code, before, after = quantized
    assert code == 0 and before == after
    model = onnx.load(str(files / "q.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) >= 1
    assert sorted(p.name for p in files.iterdir()) == ["calib.npy", "data.npy", "model.onnx", "q.onnx"]


def _bad_inputs(files, tmp_path):
    model, calib = str(files / "model.onnx"), str(files / "calib.npy")
    rng = np.random.default_rng(30)
    (tmp_path / "random.onnx").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    real = (files / "model.onnx").read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(real[: len(real) // 2])
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    for name, data in {"wrong_shape": np.zeros((4, 3, 8, 8), np.float32),
                       "zero": np.zeros((0, 3, 16, 16), np.float32)}.items():
        np.save(tmp_path / f"{name}.npy", data)
    nan = structured_images(4, seed=31)
    nan[1, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    return {
        "missing_model": [str(tmp_path / "missing.onnx"), "--calib", calib],
        "random_bytes_model": [str(tmp_path / "random.onnx"), "--calib", calib],
        "truncated_model": [str(tmp_path / "truncated.onnx"), "--calib", calib],
        "text_model": [str(tmp_path / "text.onnx"), "--calib", calib],
        "wrong_calibration_shape": [model, "--calib", str(tmp_path / "wrong_shape.npy")],
        "nan_calibration": [model, "--calib", str(tmp_path / "nan.npy")],
        "zero_samples": [model, "--calib", str(tmp_path / "zero.npy")],
        "missing_calibration": [model, "--calib", str(tmp_path / "missing.npy")],
        "unknown_target": [model, "--calib", calib, "--target", "foo"],
        "nine_bits": [model, "--calib", calib, "--bits", "9"],
        "three_bit_activations": [model, "--calib", calib, "--abits", "3"],
    }


BAD = ["missing_model", "random_bytes_model", "truncated_model", "text_model", "wrong_calibration_shape",
       "nan_calibration", "zero_samples", "missing_calibration", "unknown_target", "nine_bits",
       "three_bit_activations"]


def assert_one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("onnxrepq: error: ")
    return err


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_without_output(case, files, tmp_path, capsys):
    args = _bad_inputs(files, tmp_path)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sha256(files / "model.onnx")
    code = main(["quantize", args[0], "-o", str(out_dir / "q.onnx"), *args[1:], "--quiet"])
    assert code == 2
    assert_one_line_error(capsys)
    assert list(out_dir.iterdir()) == []  # no model and no temporary file left behind
    assert sha256(files / "model.onnx") == before


def test_output_equal_to_input_is_refused(files, capsys):
    model = files / "model.onnx"
    before = sha256(model)
    code = main(["quantize", str(model), "-o", str(model), "--calib", str(files / "calib.npy"), "--quiet"])
    assert code == 2 and "output path is the input model" in assert_one_line_error(capsys)
    assert sha256(model) == before
    assert not any(p.name.endswith(".tmp") for p in files.iterdir())


def test_missing_output_folder_is_refused(files, tmp_path, capsys):
    target = tmp_path / "absent" / "q.onnx"
    code = main(["quantize", str(files / "model.onnx"), "-o", str(target), "--calib", str(files / "calib.npy")])
    assert code == 2 and "output folder does not exist" in assert_one_line_error(capsys)
    assert not (tmp_path / "absent").exists()


def _compare(files, capsys, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["compare", str(files / "model.onnx"), str(files / "q.onnx"), "--data", str(files / "data.npy"),
                 *extra])
    return code, capsys.readouterr()


def test_compare_gates_on_min_sqnr(files, quantized, capsys):
    code, captured = _compare(files, capsys, "--json")
    summary = json.loads(captured.out)
    sqnr = summary["outputs"][0]["sqnr_db"]
    assert code == 0 and summary["samples"] == 8
    assert sqnr > 25.0  # measured 40.5 dB
    code, captured = _compare(files, capsys, "--min-sqnr", f"{sqnr + 1:.2f}")
    assert code == 3 and "below --min-sqnr" in captured.err
    code, _ = _compare(files, capsys, "--min-sqnr", f"{sqnr - 1:.2f}")
    assert code == 0


def test_fuse_writes_fewer_nodes_with_the_same_outputs(files, tmp_path, capsys):
    code = main(["fuse", str(files / "model.onnx"), "-o", str(tmp_path / "fused.onnx")])
    assert code == 0 and "wrote" in capsys.readouterr().out
    original, fused = onnx.load(str(files / "model.onnx")), onnx.load(str(tmp_path / "fused.onnx"))
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"] and len(original.graph.node) == 4
    feed = {"x": structured_images(3, seed=40)}
    expected, actual = run_ort(original, feed)[0], run_ort(fused, feed)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_inspect_says_what_it_would_quantize(files, capsys):
    assert main(["inspect", str(files / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "would quantize 1 layers (Conv)" in out and "opset 13" in out


def test_inspect_of_a_quantized_model_counts_kernels_instead_of_listing_float_layers(files, quantized, capsys):
    assert main(["inspect", "--runtime", str(files / "q.onnx")]) == 0
    out = capsys.readouterr().out
    assert "already quantized: DequantizeLinear" in out and "kept float" not in out and "would quantize" not in out
    assert "onnxruntime CPU kernels:" in out and "coverage" in out   # its one conv writes the output: float


def test_console_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "onnxrepq.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "quantize" in result.stdout and result.stderr == ""


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_output_model_gets_ordinary_file_permissions(tmp_path):
    """The temporary file behind the atomic write is private; the model written must not be."""
    import os
    import stat

    from onnxrepq.graph.io import save_model_atomic
    from tests.models_for_tests import conv_bn_model

    umask = os.umask(0o022)
    try:
        target = save_model_atomic(conv_bn_model(), tmp_path / "model.onnx")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
