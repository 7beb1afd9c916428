"""A run killed (SIGKILL) at any moment leaves no partial model at the output path and never
changes the input: the CLI killed at moments spread over a measured run, and the save step
itself killed while its temporary files are being written and between its two renames."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxrepq.graph.io import save_model_atomic
from tests.models_for_tests import conv_bn_model, structured_images

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# Fractions of one measured full run; the first half of a run is mostly imports, where a kill is trivially safe.
KILL_FRACTIONS = (0.55, 0.75, 0.92)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("killed")
    onnx.save(conv_bn_model(channels=16, size=16), str(folder / "model.onnx"))
    np.save(folder / "calib.npy", structured_images(32, seed=3))
    return folder


def quantize_command(folder: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "onnxrepq.cli", "quantize", str(folder / "model.onnx"), "-o", str(output),
            "--calib", str(folder / "calib.npy"), "--quiet"]


def assert_absent_or_complete(path: Path) -> None:
    if not path.exists():
        return
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": structured_images(2, seed=4)})
    assert out.shape == (2, 16, 16, 16) and np.all(np.isfinite(out))


def test_cli_killed_at_any_moment_leaves_no_partial_output(inputs):
    before = (inputs / "model.onnx").read_bytes()
    started = time.perf_counter()
    subprocess.run(quantize_command(inputs, inputs / "full.onnx"), env=ENV, check=True, timeout=120)
    full_run = time.perf_counter() - started
    assert_absent_or_complete(inputs / "full.onnx")
    for fraction in KILL_FRACTIONS:
        output = inputs / f"killed_{fraction}.onnx"
        child = subprocess.Popen(quantize_command(inputs, output), env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(fraction * full_run)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        assert_absent_or_complete(output)
        assert (inputs / "model.onnx").read_bytes() == before


# The child saves a model of ~30 MB in 30 tensors, so that writing it takes a while. Its os.replace
# reports each rename on stdout and waits two seconds before doing it, so a kill on seeing a
# temporary file lands before any rename, and a kill after the first rename before the second.
_SAVER = textwrap.dedent("""
    import os, sys, time
    import onnx
    from onnxrepq.graph import io
    real_replace = os.replace
    def slow_replace(source, target):
        time.sleep(2)
        real_replace(source, target)
        print("replaced", target, flush=True)
    os.replace = slow_replace
    model = onnx.load(sys.argv[1])
    io.save_model_atomic(model, sys.argv[2], external_data=sys.argv[3] == "external")
""")


def big_model(seed: int) -> onnx.ModelProto:
    from onnx import helper

    rng = np.random.default_rng(seed)
    names = [f"w{i}" for i in range(30)]
    nodes = [helper.make_node("Sum", ["x", *names], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", 1, [512, 512])],
                              [helper.make_tensor_value_info("y", 1, [512, 512])],
                              [onnx.numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), name)
                               for name in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def start_saver(tmp_path: Path, output: Path, layout: str) -> subprocess.Popen:
    source = tmp_path / "source.onnx"
    onnx.save(big_model(seed=1), str(source))
    return subprocess.Popen([sys.executable, "-c", _SAVER, str(source), str(output), layout], env=ENV,
                            stdout=subprocess.PIPE, text=True)


def kill_when(child: subprocess.Popen, appeared, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not appeared():
        assert child.poll() is None, "the saver ended before the moment to kill it"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def being_written(output: Path) -> bool:
    """A temporary file of the save (``.NAME.<random>.tmp``) exists and has bytes in it."""
    for path in output.parent.glob(f".{output.name}.*.tmp"):
        try:
            if path.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed away between the listing and the look
            pass
    return False


def y_of(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.ones((512, 512), np.float32)})[0]


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_save_killed_while_writing_leaves_no_output(tmp_path, layout):
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    child = start_saver(tmp_path, output, layout)
    kill_when(child, lambda: being_written(output))
    assert not output.exists()
    assert not list(output.parent.glob("model.onnx.*.data"))


@pytest.mark.parametrize("layout", ["inline", "external"])
def test_save_killed_while_writing_keeps_the_previous_model(tmp_path, layout):
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    previous = big_model(seed=2)
    save_model_atomic(previous, output, external_data=layout == "external")
    expected = y_of(output)
    child = start_saver(tmp_path, output, layout)
    kill_when(child, lambda: being_written(output))
    assert np.array_equal(y_of(output), expected)


def test_save_killed_between_the_two_renames_keeps_the_previous_model(tmp_path):
    """The new data file is in place, the new graph not yet: the old graph must still find its own weights."""
    output = tmp_path / "model.onnx"
    save_model_atomic(big_model(seed=2), output, external_data=True)
    expected = y_of(output)
    child = start_saver(tmp_path, output, "external")
    line = child.stdout.readline()
    assert line.startswith("replaced") and line.strip().endswith(".data")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert len(list(tmp_path.glob("model.onnx.*.data"))) == 2  # the old weights and the new
    assert np.array_equal(y_of(output), expected)
