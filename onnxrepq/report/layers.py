"""Where the error comes from: every layer's output in the quantized model against the float model's.

Both graphs keep the anchor outputs' names (the QDQ pass adds tensors, it renames none), so each
layer output is exposed as an extra graph output in both and compared on a few calibration samples.
Exposing a tensor keeps onnxruntime from fusing that conv into a QLinearConv; the float value it
then shows is the integer kernel's accumulator before requantization, the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .compare import Comparison, _session, compare_models

ANCHORS = ("Conv", "Gemm", "MatMul")


@dataclass
class _Error:
    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: np.ndarray, value: np.ndarray) -> None:
        reference = reference.astype(np.float64)
        self.signal += float(np.sum(reference ** 2))
        self.noise += float(np.sum((reference - value) ** 2))

    @property
    def sqnr_db(self) -> float | None:
        if self.noise == 0.0:
            return None  # identical: no finite SQNR (a float layer ahead of every quantized one)
        return float(10.0 * np.log10(max(self.signal, 1e-30) / self.noise))


def first_samples(feeds: Iterable[dict], count: int) -> list[dict]:
    """Up to ``count`` samples from a stream of feeds, as whole feeds (a fixed batch is not split)."""
    taken, seen = [], 0
    for feed in islice(feeds, count):
        taken.append(feed)
        seen += len(next(iter(feed.values())))
        if seen >= count:
            break
    return taken


def layer_sqnr(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, feeds: Sequence[dict],
               tensors: Sequence[str]) -> dict[str, float | None]:
    """SQNR in dB of each named tensor, quantized against float, summed over all ``feeds``."""
    present = set(_tensor_names(float_model)) & set(_tensor_names(quant_model))
    names = [name for name in dict.fromkeys(tensors) if name in present]
    float_session = _session(_with_outputs(float_model, names), 0)
    quant_session = _session(_with_outputs(quant_model, names), 0)
    errors = {name: _Error() for name in names}
    for feed in feeds:
        for name, reference, value in zip(names, float_session.run(names, feed), quant_session.run(names, feed)):
            errors[name].add(reference, value)
    return {name: errors[name].sqnr_db for name in names}


def model_comparison(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, feeds: Sequence[dict]) -> Comparison:
    """The graph outputs on the same feeds, through the unmodified (fully fused) quantized model."""
    return compare_models(float_model, quant_model, list(feeds), max_samples=sum(
        len(next(iter(feed.values()))) for feed in feeds))


def int8_weight_fraction(float_model: onnx.ModelProto, quantized_layers: set[str]) -> float:
    """The share of Conv/Gemm/MatMul weight elements (constant second inputs) stored in int8."""
    sizes = {init.name: int(np.prod(init.dims)) for init in float_model.graph.initializer}
    total = quantized = 0
    for node in float_model.graph.node:
        if node.op_type in ANCHORS and len(node.input) > 1 and node.input[1] in sizes:
            total += sizes[node.input[1]]
            quantized += sizes[node.input[1]] if node.name in quantized_layers else 0
    return quantized / total if total else 0.0


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    return [name for node in model.graph.node for name in node.output]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    existing = {output.name for output in exposed.graph.output}
    exposed.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                for name in names if name not in existing)
    return exposed
