"""Streaming statistics of the planned tensors over the calibration set."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from ..config import CalibrationConfig
from ..errors import CalibrationError, ModelError
from .data import CalibrationSet, Feed
from .histogram import StreamingHistogram
from .runner import run_tensors, session_for


def observe(model: onnx.ModelProto, feed: Feed) -> dict[str, np.ndarray]:
    """Run one batch and return every intermediate tensor: dtypes and shapes for the planner.

    Shape inference gives up on dynamic dims and unknown ops; a real run does not.
    """
    names = [out for node in model.graph.node for out in node.output if out]
    try:
        session = session_for(model, names)
        values = session.run(names, feed)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot run the model on the calibration data: {_first_line(exc)}") from None
    return dict(zip(names, values))


def collect_histograms(model: onnx.ModelProto, tensors: Sequence[str], calibration: CalibrationSet,
                       config: CalibrationConfig, seed: int = 0,
                       progress: Optional[Callable[[int], None]] = None) -> dict[str, StreamingHistogram]:
    histograms = {name: StreamingHistogram(bins=config.histogram_bins, sample_elements=config.sample_elements,
                                           seed=seed + i) for i, name in enumerate(tensors)}
    session = session_for(model, tensors)
    for values in run_tensors(session, calibration, list(tensors)):
        for name, value in values.items():
            if not np.all(np.isfinite(value)):
                raise CalibrationError(f"tensor {name!r} becomes NaN/Inf on the calibration data;"
                                       " the float model itself overflows")
            histograms[name].update(value)
        if progress is not None:
            progress(1)
    return histograms


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
