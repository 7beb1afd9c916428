"""Fixtures shared by the reconstruction tests."""
import importlib.util

import pytest


@pytest.fixture
def rapidocr_models():
    """The PP-OCR models are a requirement of the suite, not an optional extra: fail, never skip."""
    assert importlib.util.find_spec("rapidocr_onnxruntime") is not None, \
        "the real-model tests need `pip install --no-deps rapidocr-onnxruntime` (.ci/run does it)"
