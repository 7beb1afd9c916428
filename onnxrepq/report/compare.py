"""Float vs quantized on the same inputs: the numbers a pipeline gates a model on."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from ..calibrate.data import calibration_set, input_specs
from ..errors import ModelError


@dataclass
class OutputComparison:
    name: str
    sqnr_db: float
    cosine: float
    top1_agreement: float | None  # classifier-like outputs only (rank 2, several classes)


@dataclass
class Comparison:
    outputs: list[OutputComparison]
    samples: int
    speedup: float  # float latency / quantized latency, median over the data

    @property
    def min_sqnr_db(self) -> float:
        return min(o.sqnr_db for o in self.outputs)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approximation) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def compare_models(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, data, max_samples: int = 256,
                   threads: int = 0) -> Comparison:
    float_session, quant_session = _session(float_model, threads), _session(quant_model, threads)
    feeds = calibration_set(data, input_specs(float_model), max_samples)
    names = [o.name for o in float_session.get_outputs()]
    if names != [o.name for o in quant_session.get_outputs()]:
        raise ModelError("the two models have different outputs; compare needs the same model before and after")
    collected: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    float_times, quant_times, samples = [], [], 0
    for feed in feeds:
        started = time.perf_counter()
        reference = float_session.run(names, feed)
        float_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = quant_session.run(names, feed)
        quant_times.append(time.perf_counter() - started)
        for name, ref, res in zip(names, reference, result):
            collected[name].append((ref, res))
        samples += len(next(iter(feed.values())))
    outputs = [_compare_output(name, pairs) for name, pairs in collected.items()]
    return Comparison(outputs, samples, float(np.median(float_times) / max(np.median(quant_times), 1e-12)))


def _compare_output(name: str, pairs) -> OutputComparison:
    reference = np.concatenate([p[0].reshape(p[0].shape[0], -1) if p[0].ndim else p[0].reshape(1, 1) for p in pairs])
    result = np.concatenate([p[1].reshape(p[1].shape[0], -1) if p[1].ndim else p[1].reshape(1, 1) for p in pairs])
    ref64, res64 = reference.astype(np.float64).ravel(), result.astype(np.float64).ravel()
    denominator = np.linalg.norm(ref64) * np.linalg.norm(res64)
    cosine = float(ref64 @ res64 / denominator) if denominator else 1.0
    top1 = None
    if pairs[0][0].ndim == 2 and pairs[0][0].shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == result.argmax(axis=1)))
    return OutputComparison(name, sqnr_db(reference, result), cosine, top1)


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
