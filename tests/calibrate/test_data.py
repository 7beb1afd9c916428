"""Calibration sources: every accepted form yields the same checked samples; bad data fails as CalibrationError."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from onnx import helper

from onnxrepq.calibrate.data import calibration_set, input_specs
from onnxrepq.errors import CalibrationError
from tests.models_for_tests import make_model

SAMPLES = np.random.default_rng(1).standard_normal((6, 3, 4, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def specs():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["n", 3, 4, 4]}, ["y"])
    return input_specs(model)


@pytest.fixture(scope="module")
def two_input_specs():
    model = make_model([helper.make_node("Add", ["a", "b"], ["y"])], {"a": ["n", 4], "b": ["n", 4]}, ["y"])
    return input_specs(model)


def samples_of(source, specs, max_samples=256) -> np.ndarray:
    feeds = list(calibration_set(source, specs, max_samples))
    assert all(set(feed) == {"x"} and feed["x"].shape[0] == 1 for feed in feeds)  # one sample per run
    return np.concatenate([feed["x"] for feed in feeds])


class Reader:
    """The CalibrationDataReader protocol of onnxruntime: get_next() until None."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _write_npy(tmp_path):
    np.save(tmp_path / "x.npy", SAMPLES)
    return tmp_path / "x.npy"


def _write_npz(tmp_path):
    np.savez(tmp_path / "x.npz", x=SAMPLES)
    return tmp_path / "x.npz"


def _write_folder(tmp_path, batch):
    for index in range(0, len(SAMPLES), batch):
        chunk = SAMPLES[index] if batch == 1 else SAMPLES[index:index + batch]  # single samples lack the batch axis
        np.save(tmp_path / f"{index:03d}.npy", chunk)
    return tmp_path


SOURCES = {
    "npy": _write_npy,
    "npz": _write_npz,
    "folder_single_samples": lambda tmp_path: _write_folder(tmp_path, 1),
    "folder_batches": lambda tmp_path: _write_folder(tmp_path, 2),
    "ndarray": lambda _: SAMPLES,
    "dict": lambda _: {"x": SAMPLES},
    "list_of_feeds": lambda _: [{"x": SAMPLES[i:i + 2]} for i in range(0, 6, 2)],
    "generator": lambda _: (SAMPLES[i:i + 3] for i in range(0, 6, 3)),
    "reader": lambda _: Reader([{"x": SAMPLES[i:i + 1]} for i in range(6)]),
    "dataloader": lambda _: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(SAMPLES), torch.arange(6)), batch_size=4),
}


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_yields_the_samples_twice(kind, specs, tmp_path):
    source = SOURCES[kind](tmp_path)
    data = calibration_set(source, specs, 256)
    first = np.concatenate([feed["x"] for feed in data])
    second = np.concatenate([feed["x"] for feed in data])  # one-shot sources are replayed, not lost
    np.testing.assert_array_equal(first, SAMPLES)
    np.testing.assert_array_equal(second, SAMPLES)
    assert data.count() == 6


@pytest.mark.parametrize("kind", ["ndarray", "generator", "folder_batches"])
def test_max_samples_limits_the_stream(kind, specs, tmp_path):
    np.testing.assert_array_equal(samples_of(SOURCES[kind](tmp_path), specs, max_samples=3), SAMPLES[:3])


def test_float64_data_is_cast_to_float32(specs):
    values = samples_of(SAMPLES.astype(np.float64), specs)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, SAMPLES)


def test_two_input_model_takes_a_dict(two_input_specs):
    a, b = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    feeds = list(calibration_set({"a": a, "b": b}, two_input_specs, 256))
    assert len(feeds) == 3 and all(set(f) == {"a", "b"} for f in feeds)


def _bad_single_input(tmp_path):
    (tmp_path / "data.txt").write_text("1 2 3")
    nan, inf = SAMPLES.copy(), SAMPLES.copy()
    nan[2, 0, 1, 1], inf[4, 2, 0, 0] = np.nan, -np.inf
    return {
        "wrong_rank": (SAMPLES[..., None], "expects rank 4"),
        "wrong_fixed_dim": (SAMPLES[:, :2], "expects [?, 3, 4, 4]"),
        "int_data": (SAMPLES.astype(np.int32), "expects float32"),
        "nan": (nan, "NaN or Inf"),
        "inf": (inf, "NaN or Inf"),
        "zero_samples": (np.zeros((0, 3, 4, 4), np.float32), "holds no samples"),
        "missing_path": (tmp_path / "missing.npy", "not found"),
        "unsupported_suffix": (tmp_path / "data.txt", "must be .npy, .npz"),
        "empty_folder": (tmp_path / "empty", "holds no .npy"),
    }


@pytest.mark.parametrize("case", ["wrong_rank", "wrong_fixed_dim", "int_data", "nan", "inf", "zero_samples",
                                  "missing_path", "unsupported_suffix", "empty_folder"])
def test_bad_single_input_data_is_refused(case, specs, tmp_path):
    (tmp_path / "empty").mkdir()
    source, message = _bad_single_input(tmp_path)[case]
    with pytest.raises(CalibrationError, match=re.escape(message)):
        list(calibration_set(source, specs, 256))


@pytest.mark.parametrize("source, message", [
    ({"a": np.ones((2, 4), np.float32)}, "lacks model input"),
    (np.ones((2, 4), np.float32), "bare array fits single-input models only"),
    ({"a": np.ones((2, 4), np.float32), "b": np.ones((3, 4), np.float32)}, "disagree on the number of samples"),
])
def test_bad_two_input_data_is_refused(source, message, two_input_specs):
    with pytest.raises(CalibrationError, match=re.escape(message)):
        list(calibration_set(source, two_input_specs, 256))


@pytest.mark.parametrize("kind", ["generator", "reader", "dataloader"])
def test_one_shot_source_survives_an_abandoned_first_pass(kind, specs, tmp_path):
    # quantize() reads one batch to observe dtypes, then iterates the whole set
    data = calibration_set(SOURCES[kind](tmp_path), specs, 256)
    assert next(iter(data))["x"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(np.concatenate([feed["x"] for feed in data]), SAMPLES)
    np.testing.assert_array_equal(np.concatenate([feed["x"] for feed in data]), SAMPLES)


def test_a_memory_mapped_file_is_converted_and_scanned_a_step_at_a_time(tmp_path):
    """float64 data for a float32 input: the whole file converted at once would copy it into memory."""
    import tracemalloc

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": ["n", 3, 32, 32]}, ["y"])
    data = np.random.default_rng(2).standard_normal((256, 3, 32, 32))  # 6.3 MB of float64
    np.save(tmp_path / "big.npy", data)
    del data
    tracemalloc.start()
    try:
        count = sum(len(feed["x"]) for feed in calibration_set(tmp_path / "big.npy", input_specs(model), 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 256 and peak < 1_000_000  # one float32 sample is 12 kB; the file as float32 3.1 MB
