"""Upgrade the default-domain opset, because per-channel QDQ (the ``axis`` attribute) needs 13."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from ..errors import ModelError
from .base import PassResult

MIN_OPSET = 13


class UpgradeOpset:
    """Convert the graph to ``min_opset`` with onnx's version converter when it is older.

    The converter rewrites the ops whose signatures changed (Squeeze/Unsqueeze/Split/Reduce* axes
    move from attributes to inputs at 13); bumping the import number alone would silently change
    their meaning, which is how onnxruntime's quantizer produces invalid opset-12 graphs.
    """

    name = "upgrade_opset"

    def __init__(self, min_opset: int = MIN_OPSET):
        self.min_opset = min_opset

    def __call__(self, graph: gs.Graph) -> PassResult:
        current = graph.opset
        if current >= self.min_opset:
            return PassResult(graph, False)
        model = gs.export_onnx(graph)
        try:
            converted = version_converter.convert_version(model, self.min_opset)
        except Exception as exc:
            raise ModelError(f"cannot upgrade the model from opset {current} to {self.min_opset}"
                             f" (needed for per-channel weights): {str(exc).splitlines()[0][:200]}") from None
        if converted.ir_version < 7:
            converted.ir_version = 7
        new_graph = gs.import_onnx(converted)
        return PassResult(new_graph, True, [f"opset {current} -> {self.min_opset}"])
