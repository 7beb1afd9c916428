"""Run the float model in onnxruntime and hand out the intermediate tensors asked for."""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..graph.external import exceeds_protobuf, point_at, write_weights
from ..errors import CalibrationError
from .data import Feed


def session_for(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), threads: int = 0,
                optimize: bool = False) -> ort.InferenceSession:
    """A CPU session whose outputs are the model's outputs followed by ``extra_outputs``.

    Asking for an intermediate tensor as a graph output keeps onnxruntime from fusing it away;
    extra outputs need no type information, onnxruntime infers it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if exceeds_protobuf(model):
        return _session_from_files(model, extra_outputs, options)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    present = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _session_from_files(model: onnx.ModelProto, extra_outputs: Sequence[str],
                        options: ort.SessionOptions) -> ort.InferenceSession:
    """A model past 2 GiB cannot be serialised to hand onnxruntime the bytes: it reads the graph
    and its weights from a temporary folder instead, which goes once the session holds them."""
    with tempfile.TemporaryDirectory(prefix="onnxrepq-session-") as folder:
        with open(os.path.join(folder, "weights.data"), "wb") as data:
            light, _ = write_weights(model, data, extra_outputs)
        point_at(light, "weights.data")
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as handle:
            handle.write(light.SerializeToString())
        del light
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_tensors(session: ort.InferenceSession, feeds: Iterable[Feed], names: Sequence[str]
                ) -> Iterator[dict[str, np.ndarray]]:
    """Yield {tensor name: value} for each feed, ``names`` only."""
    for feed in feeds:
        values = session.run(list(names), feed)
        yield dict(zip(names, values))


def run_finite_tensors(session: ort.InferenceSession, feeds: Iterable[Feed], names: Sequence[str]
                       ) -> Iterator[dict[str, np.ndarray]]:
    """run_tensors for statistics: a NaN/Inf is the float model overflowing, said once, here."""
    for values in run_tensors(session, feeds, names):
        for name, value in values.items():
            if not np.all(np.isfinite(value)):
                raise CalibrationError(f"tensor {name!r} becomes NaN/Inf on the calibration data;"
                                       " the float model itself overflows")
        yield values
