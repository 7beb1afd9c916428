"""Accuracy of zoo models as onnxruntime runs them, in fp32 and after onnxruntime's own int8 PTQ.

The int8 numbers are the baseline onnxrepq has to beat, so they use onnxruntime's quantizer the
way its documentation shows: quant_pre_process, then quantize_static (QDQ, per-channel QInt8
weights, QUInt8 activations, MinMax calibration).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from tools.zoo.export import INPUT_NAME


def open_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def top1(path: Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent."""
    session = open_session(path)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = session.run(None, {INPUT_NAME: images[start:start + batch_size]})[0]
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return 100.0 * correct / len(images)


class ArrayCalibrationReader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int = 64):
        self.batches = iter([images[start:start + batch_size] for start in range(0, len(images), batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


@dataclass(frozen=True)
class OrtInt8Result:
    top1: float
    preprocessed: bool
    note: str


def preprocess(model_path: Path, output_path: Path) -> tuple[bool, str]:
    """quant_pre_process fails on some graphs; then quantize the model as exported and say so."""
    try:
        quant_pre_process(str(model_path), str(output_path))
        return True, "quant_pre_process succeeded (it folds Conv+BatchNormalization before quantization)"
    except Exception as error:  # onnxruntime raises assorted types here
        return False, f"quant_pre_process failed ({type(error).__name__}: {error}); quantize_static ran on the raw model"


def method_description(calibration_count: int) -> str:
    return (f"onnxruntime {ort.__version__} quantize_static: QDQ, per_channel=True, QUInt8 activations, "
            f"QInt8 weights, MinMax, calibrated on all {calibration_count} calib-split images (batches of 64)")


def ort_int8_top1(model_path: Path, calibration: np.ndarray, images: np.ndarray, labels: np.ndarray) -> OrtInt8Result:
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        preprocessed, note = preprocess(model_path, prepared)
        quantized = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared if preprocessed else model_path), str(quantized), ArrayCalibrationReader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return OrtInt8Result(top1(quantized, images, labels), preprocessed, note)
