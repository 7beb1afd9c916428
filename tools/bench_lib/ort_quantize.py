"""Child process: the onnxruntime static-quantization baseline for one model.

Usage: python -m tools.bench_lib.ort_quantize MODEL OUT CALIB {minmax,percentile}
QDQ, per-channel, QUInt8 activations, QInt8 weights. ORT's documented recipe runs `quant_pre_process`
(shape inference + optimisation) first; it fails on some exported graphs, so we retry without symbolic
shape inference, then fall back to the raw model, and print what happened as JSON on the last stdout
line for the bench to record. Opset < 13 models are converted to 13 first (see upgrade_opset).
On an x86 host without VNNI the baseline gets `reduce_range=True`, onnxruntime's documented remedy
for its u8 x s8 kernels saturating there (onnxrepq/emit/saturation.py), so it is not a straw man.
"""
import json
import os
import sys
import tempfile
import traceback

import onnx
import onnx.version_converter
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from onnxrepq.emit.saturation import host_saturates_u8s8
from tools.bench_lib.calib_files import read_calibration

PER_CHANNEL_OPSET = 13
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
    """Returns (model to quantize, 'ok' or what went wrong).

    Paddle exports keep weights in Constant nodes; only pre-processing (onnxruntime's optimiser) turns
    them into initializers, and the quantizer treats weights that are not initializers as activations.
    So when symbolic shape inference fails we retry without it before giving up on pre-processing.
    """
    output = os.path.join(work_dir, "preprocessed.onnx")
    problems = []
    for skip_symbolic_shape in (False, True):
        try:
            quant_pre_process(model_path, output, skip_symbolic_shape=skip_symbolic_shape)
            onnx.checker.check_model(output)
        except Exception as error:  # noqa: BLE001 - any failure means "try the next option", which we record
            problems.append(one_line(error))
            continue
        return output, "ok" if not problems else f"ok only with skip_symbolic_shape ({problems[0]})"
    return model_path, "failed: " + "; then ".join(problems) + "; quantized the raw model"


def upgrade_opset(model_path: str, work_dir: str) -> tuple[str, str | None]:
    """Per-channel QDQ needs DequantizeLinear's `axis` (opset 13); onnxruntime's quantizer writes it into
    an opset 11/12 model anyway, and onnxruntime then refuses to load the result ("Unrecognized attribute:
    axis"). Returns (model path, note or None when nothing was needed)."""
    model = onnx.load(model_path)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= PER_CHANNEL_OPSET:
        return model_path, None
    output = os.path.join(work_dir, "opset13.onnx")
    try:
        onnx.save(onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET), output)
    except Exception as error:  # noqa: BLE001 - recorded; the quantizer then gets the old opset
        return model_path, f"opset {opset} -> {PER_CHANNEL_OPSET} conversion failed: {one_line(error)}"
    return output, f"converted opset {opset} -> {PER_CHANNEL_OPSET} for per-channel QDQ"


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
        source, opset_note = upgrade_opset(source, work_dir)
        notes = [f"quant_pre_process {status}"] if status != "ok" else []
        reduce_range = host_saturates_u8s8()
        if reduce_range:
            notes.append("reduce_range (host without VNNI)")
        quantize_static(source, output_path, ArrayReader(arrays), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CALIBRATION_METHODS[method])
    print(json.dumps({"notes": notes + ([opset_note] if opset_note else [])}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
