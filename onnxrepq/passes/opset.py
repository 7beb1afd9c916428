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
            note = f"opset {current} -> {self.min_opset}"
        except Exception as exc:
            changed = _ops_changed_since(model, current, self.min_opset)
            if changed:
                raise ModelError(f"cannot upgrade the model from opset {current} to {self.min_opset}"
                                 f" (needed for per-channel weights): {str(exc).splitlines()[0][:200]}") from None
            # The converter has no adapter for some op, but no op in this graph changed its
            # definition between the two opsets: the same graph is valid at the new number.
            converted = model
            _set_default_opset(converted, self.min_opset)
            note = f"opset {current} -> {self.min_opset} (renumbered: no op in the graph changed)"
        if converted.ir_version < 7:
            converted.ir_version = 7
        new_graph = gs.import_onnx(converted)
        return PassResult(new_graph, True, [note])


def _ops_changed_since(model: onnx.ModelProto, old: int, new: int) -> list[str]:
    changed = []
    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        try:
            before = onnx.defs.get_schema(op, old).since_version
            after = onnx.defs.get_schema(op, new).since_version
        except Exception:
            changed.append(op)
            continue
        if before != after:
            changed.append(op)
    return changed


def _set_default_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
