"""The zoo dataset is reproducible and well-formed, and the shipped zoo models match their cards.

Model accuracy is re-measured on the first 1000 test images (about a second per model) and
compared with the card's `fp32_top1_first_1000_test`; the full-split `fp32_top1` differs from it
by sampling noise (~1 point), so a 0.5-point check against it would be flaky, not strict.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest

from tools.zoo import card, data, fonts, nets, ort_eval

# sha256 of make_split(split, 64) (images then labels), dataset version 2, seed 0,
# matplotlib's bundled fonts. Rendering changes must bump DATASET_VERSION and these digests.
EXPECTED_DIGESTS = {
    "train": "7447bc499d8f96939f5409676a002f70b0ef2518a2c8b9498ad3b6ade7819d2b",
    "test": "b65fdca21e2e7bb65a9d1349d8f228e540949c99ed755c61d0b87e9dfa1c2264",
    "calib": "004850f9cb68b9f3120612eb2fa9a5dd8b28298def33e15b4ed66e89589447a2",
}
SAMPLES = 64
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
MODEL_DIRS = sorted(path.parent for path in MODELS_DIR.glob("*/model.onnx"))


@pytest.fixture(scope="module")
def small_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: data.make_split(split, SAMPLES, use_cache=False) for split in data.SPLIT_SIZES}


@pytest.mark.parametrize("split", sorted(EXPECTED_DIGESTS))
def test_split_regenerates_bit_identically(small_splits, split):
    assert data.split_digest(*small_splits[split]) == EXPECTED_DIGESTS[split]


def test_any_index_range_renders_alone_as_in_the_full_split(small_splits):
    middle = data.normalise(data.render_range("test", 10, 20))
    np.testing.assert_array_equal(middle, small_splits["test"][0][10:20])


def test_parallel_rendering_matches_serial(small_splits):
    parallel = data.render_split("train", SAMPLES, workers=2)
    np.testing.assert_array_equal(data.normalise(parallel), small_splits["train"][0])


def test_cache_returns_what_rendering_returns(small_splits, tmp_path):
    rendered_then_cached = data.make_split("calib", SAMPLES, cache_dir=tmp_path)
    read_back = data.make_split("calib", SAMPLES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for images, labels in (rendered_then_cached, read_back):
        np.testing.assert_array_equal(images, small_splits["calib"][0])
        np.testing.assert_array_equal(labels, small_splits["calib"][1])


def test_splits_share_no_image(small_splits):
    seen = collections.defaultdict(set)
    for split, (images, _) in small_splits.items():
        for image in images:
            seen[image.tobytes()].add(split)
    assert all(len(splits) == 1 for splits in seen.values())
    assert len(seen) == SAMPLES * len(small_splits)  # no duplicates within a split either


def test_splits_draw_from_different_generators():
    first_draws = {split: data.sample_generator(0, split, 7).integers(2**62) for split in data.SPLIT_SIZES}
    assert len(set(first_draws.values())) == len(data.SPLIT_SIZES)


def test_shapes_dtypes_and_normalisation(small_splits):
    for images, labels in small_splits.values():
        assert images.shape == (SAMPLES, 3, 32, 32) and images.dtype == np.float32
        assert labels.shape == (SAMPLES,) and labels.dtype == np.int64
        assert images.min() >= (0 - data.PIXEL_MEAN) / data.PIXEL_STD
        assert images.max() <= (1 - data.PIXEL_MEAN) / data.PIXEL_STD
        assert 0.3 < images.std() < 2.0  # textured, not blank
        assert images[:, 0].std() != pytest.approx(images[:, 1].std())  # real colour, not replicated grey


@pytest.mark.parametrize("split", sorted(data.SPLIT_SIZES))
def test_labels_are_balanced(split):
    counts = np.bincount([data.label_of(index) for index in range(data.SPLIT_SIZES[split])], minlength=62)
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1


def test_only_text_fonts_are_used():
    names = [path.name for path in fonts.text_fonts()]
    assert len(names) == 22
    assert not any(name.startswith(fonts.NOT_TEXT_FONTS) for name in names)
    assert not any(name.startswith(("STIXSiz", "STIXNonUni", "DejaVuSansDisplay")) for name in names)


def test_zoo_has_every_family():
    assert sorted(path.name for path in MODEL_DIRS) == sorted(nets.FAMILY_SPECS)


@pytest.fixture(scope="module")
def quick_test_split() -> tuple[np.ndarray, np.ndarray]:
    return data.make_split("test", card.QUICK_TEST_COUNT, use_cache=False)


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda path: path.name)
def test_model_keeps_training_form_and_matches_card(model_dir, quick_test_split):
    model_card = card.read_card(model_dir)
    ops = collections.Counter(node.op_type for node in onnx.load(model_dir / "model.onnx").graph.node)
    assert ops["BatchNormalization"] > 0 and ops["Add"] > 0
    measured = ort_eval.top1(model_dir / "model.onnx", *quick_test_split)
    assert measured == pytest.approx(model_card["fp32_top1_first_1000_test"], abs=0.5)
    assert 50.0 < model_card["fp32_top1"] < 100.0


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda path: path.name)
def test_deploy_form_computes_the_same_logits(model_dir):
    calibration = np.load(model_dir / "calib.npy")
    np.testing.assert_array_equal(calibration, data.make_split("calib", 64, use_cache=False)[0])
    deploy_ops = collections.Counter(node.op_type for node in onnx.load(model_dir / "deploy.onnx").graph.node)
    assert deploy_ops["BatchNormalization"] == 0
    training_form = ort_eval.open_session(model_dir / "model.onnx").run(None, {"input": calibration})[0]
    deployed = ort_eval.open_session(model_dir / "deploy.onnx").run(None, {"input": calibration})[0]
    np.testing.assert_allclose(deployed, training_form, atol=1e-3 * np.abs(training_form).max())
