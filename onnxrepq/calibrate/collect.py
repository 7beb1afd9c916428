"""Streaming statistics of the planned tensors over the calibration set."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from ..config import CalibrationConfig
from ..errors import ModelError
from .channel_stats import ChannelStats
from .data import CalibrationSet, Feed
from .histogram import StreamingHistogram
from .runner import run_finite_tensors, session_for


def float_tensors(model: onnx.ModelProto, feed: Feed) -> set[str]:
    """Names of the float32 tensors the graph computes, for the planner.

    Types come from onnx shape inference; the tensors it leaves untyped (unknown ops, dynamic
    control flow) are observed in a real onnxruntime run of one batch. Only those are fetched,
    so a large model does not hold every intermediate tensor in memory at once.
    """
    names = [out for node in model.graph.node for out in node.output if out]
    known = _inferred_types(model)
    unknown = [name for name in names if name not in known]
    try:
        session = session_for(model, unknown)
        values = session.run([o.name for o in model.graph.output] + unknown, feed)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot run the model on the calibration data: {_first_line(exc)}") from None
    observed = dict(zip([o.name for o in model.graph.output] + unknown, values))
    result = {name for name, elem in known.items() if elem == onnx.TensorProto.FLOAT}
    result |= {name for name in unknown if np.asarray(observed[name]).dtype == np.float32}
    return result


def _inferred_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}


def collect_histograms(model: onnx.ModelProto, tensors: Sequence[str], calibration: CalibrationSet,
                       config: CalibrationConfig, seed: int = 0,
                       progress: Optional[Callable[[int], None]] = None,
                       channel_stats: Optional[dict[str, ChannelStats]] = None) -> dict[str, StreamingHistogram]:
    """Histograms of ``tensors``; ``channel_stats``, when given, is filled with theirs in the same run."""
    histograms = {name: StreamingHistogram(bins=config.histogram_bins, sample_elements=config.sample_elements,
                                           seed=seed + i) for i, name in enumerate(tensors)}
    session = session_for(model, tensors)
    for values in run_finite_tensors(session, calibration, list(tensors)):
        for name, value in values.items():
            histograms[name].update(value)
            if channel_stats is not None:
                channel_stats.setdefault(name, ChannelStats()).update(value)
        if progress is not None:
            progress(1)
    return histograms


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
