"""Fold everything computable before the first input arrives (shape arithmetic, constant chains)."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import PassResult


class FoldConstants:
    """Evaluate constant subgraphs with onnxruntime (onnx-graphsurgeon's folder) and drop them.

    Exported graphs compute reshape targets from ``Shape`` ops and carry constant chains such
    as ``Cast(Constant)``; folding them first lets the pattern passes see plain initializers.
    Shapes that depend on dynamic input dimensions stay as they are.
    """

    name = "fold_constants"

    def __call__(self, graph: gs.Graph) -> PassResult:
        before = len(graph.nodes)
        graph.fold_constants(error_ok=True).cleanup()
        graph.toposort()
        removed = before - len(graph.nodes)
        return PassResult(graph, removed > 0, [f"{removed} nodes folded"] if removed else [])
