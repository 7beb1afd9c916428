"""Child process: the onnxruntime static-quantization baseline for one model.

Usage: python -m tools.bench_lib.ort_quantize MODEL OUT CALIB {minmax,percentile}
QDQ, per-channel, QUInt8 activations, QInt8 weights. ORT's documented recipe runs `quant_pre_process`
(shape inference + optimisation) first; it fails on some exported graphs, so we fall back to the raw
model and print the reason as JSON on the last stdout line for the bench to record.
"""
import json
import os
import sys
import tempfile
import traceback

import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from tools.bench_lib.calib_files import read_calibration

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}


class ArrayReader(CalibrationDataReader):
    """Feeds the calibration arrays one sample at a time (batch 1)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.count = len(next(iter(arrays.values())))
        self.index = 0

    def get_next(self):
        if self.index >= self.count:
            return None
        sample = {name: array[self.index:self.index + 1] for name, array in self.arrays.items()}
        self.index += 1
        return sample

    def rewind(self):
        self.index = 0


def preprocess(model_path: str, work_dir: str) -> tuple[str, str]:
    """Returns (model to quantize, 'ok' or 'failed: <reason>')."""
    output = os.path.join(work_dir, "preprocessed.onnx")
    try:
        quant_pre_process(model_path, output)
        onnx.checker.check_model(output)
        return output, "ok"
    except Exception as error:  # noqa: BLE001 - any failure means "use the raw model", which we record
        return model_path, "failed: " + one_line(error)


def one_line(error: BaseException) -> str:
    """First line of the message; a bare assert has none, so name where it was raised instead."""
    message = str(error).strip().splitlines()
    if message:
        return f"{type(error).__name__}: {message[0][:200]}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}"


def main(model_path: str, output_path: str, calib_path: str, method: str) -> None:
    input_names = [i.name for i in onnx.load(model_path, load_external_data=False).graph.input]
    arrays = read_calibration(calib_path, input_names)
    with tempfile.TemporaryDirectory() as work_dir:
        source, status = preprocess(model_path, work_dir)
        quantize_static(source, output_path, ArrayReader(arrays), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CALIBRATION_METHODS[method])
    print(json.dumps({"preprocess": status}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
