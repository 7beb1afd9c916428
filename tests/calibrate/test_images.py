"""Calibration from a folder of images: decoding, resizing and normalisation give the expected tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper
from PIL import Image

from onnxrepq.api import quantize_with_result
from onnxrepq.calibrate.data import calibration_set, input_specs
from onnxrepq.calibrate.images import ImageFolder, ImagePreprocess, is_image_folder
from onnxrepq.cli import main
from onnxrepq.config import CalibrationConfig, QuantConfig
from onnxrepq.errors import CalibrationError
from tests.models_for_tests import conv_bn_model, make_model


def write_images(folder, count: int = 3, height: int = 8, width: int = 12) -> list[np.ndarray]:
    """Images whose pixel (y, x) is (10 * i + y, x, 200) for image i: every value predictable."""
    folder.mkdir(exist_ok=True)
    images = []
    for index in range(count):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = (10 * index + np.arange(height))[:, None]
        pixels[..., 1] = np.arange(width)[None, :]
        pixels[..., 2] = 200
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
        images.append(pixels)
    return images


def specs_for(shape):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": shape}, ["y"])
    return input_specs(model)


def test_folder_becomes_normalised_nchw_samples(tmp_path):
    write_images(tmp_path / "images")
    spec = ImagePreprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0))
    samples = list(ImageFolder(tmp_path / "images", spec, specs_for(["n", 3, 8, 12])))
    assert len(samples) == 3 and samples[0]["x"].shape == (1, 3, 8, 12) and samples[0]["x"].dtype == np.float32
    # image 1, pixel (y=2, x=5): R = 12, G = 5, B = 200
    pixel = samples[1]["x"][0, :, 2, 5]
    np.testing.assert_allclose(pixel, [(12 / 255 - 0.5) / 0.5, (5 / 255 - 0.25) / 0.5, 200 / 255 / 2.0], rtol=1e-6)


def test_bgr_nhwc_and_resize(tmp_path):
    write_images(tmp_path / "images", height=8, width=12)
    spec = ImagePreprocess(size=(4, 6), channel_order="BGR", layout="NHWC", scale=1.0)
    sample = next(iter(ImageFolder(tmp_path / "images", spec, specs_for(["n", "h", "w", 3]))))["x"]
    assert sample.shape == (1, 4, 6, 3)
    assert np.allclose(sample[0, :, :, 0], 200)  # blue first
    assert np.all(np.diff(sample[0, :, 0, 2]) > 0) and np.all(np.diff(sample[0, 0, :, 1]) > 0)  # red down, green along


def test_center_crop_after_shorter_side(tmp_path):
    write_images(tmp_path / "images", height=8, width=12)
    spec = ImagePreprocess(size=(8, 8), resize_shorter=8, center_crop=True, scale=1.0)
    sample = next(iter(ImageFolder(tmp_path / "images", spec, specs_for(["n", 3, 8, 8]))))["x"]
    np.testing.assert_array_equal(sample[0, 1, 0], np.arange(2, 10))  # green = x, columns 2..9 kept


def test_free_size_needs_a_spec(tmp_path):
    write_images(tmp_path / "images")
    with pytest.raises(CalibrationError, match="image size"):
        ImageFolder(tmp_path / "images", None, specs_for(["n", 3, "h", "w"]))


def test_quantize_from_an_image_folder(tmp_path):
    write_images(tmp_path / "images", count=4, height=16, width=16)
    assert is_image_folder(tmp_path / "images") and not is_image_folder(tmp_path)
    config = QuantConfig(fast=True, calibration=CalibrationConfig(images=ImagePreprocess(mean=(0.5,) * 3)))
    result = quantize_with_result(conv_bn_model(channels=4, size=16), str(tmp_path / "images"), config)
    assert result.calibration_samples == 4


def test_cli_image_flags(tmp_path):
    write_images(tmp_path / "images", count=2, height=20, width=20)
    (tmp_path / "model.onnx").write_bytes(conv_bn_model(channels=4, size=16).SerializeToString())
    assert main(["quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "images"), "--fast", "--quiet", "--image-size", "16", "16",
                 "--image-mean", "0.5", "--image-std", "0.25", "--bgr"]) == 0


def test_a_torch_dataloader_is_accepted():
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3, 4, 4), torch.zeros(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    feeds = list(calibration_set(loader, specs_for(["n", 3, 4, 4]), max_samples=10))
    assert sum(len(feed["x"]) for feed in feeds) == 10
    np.testing.assert_allclose(feeds[5]["x"][0], dataset.tensors[0][5].numpy())
