"""Run the float model in onnxruntime and hand out the intermediate tensors asked for."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .data import Feed


def session_for(model: onnx.ModelProto, extra_outputs: Sequence[str] = (), threads: int = 0,
                optimize: bool = False) -> ort.InferenceSession:
    """A CPU session whose outputs are the model's outputs followed by ``extra_outputs``.

    Asking for an intermediate tensor as a graph output keeps onnxruntime from fusing it away;
    extra outputs need no type information, onnxruntime infers it.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    present = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_tensors(session: ort.InferenceSession, feeds: Iterable[Feed], names: Sequence[str]
                ) -> Iterator[dict[str, np.ndarray]]:
    """Yield {tensor name: value} for each feed, ``names`` only."""
    for feed in feeds:
        values = session.run(list(names), feed)
        yield dict(zip(names, values))
