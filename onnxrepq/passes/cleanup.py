"""Drop what computes nothing: Identity nodes, dead nodes, unused initializers."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..graph.patterns import bypass_node, can_bypass
from .base import PassResult


class Cleanup:
    """Remove Identity and Dropout (inference) nodes and everything that no output depends on."""

    name = "cleanup"

    def __call__(self, graph: gs.Graph) -> PassResult:
        before = len(graph.nodes)
        for node in list(graph.nodes):
            if node.op in ("Identity", "Dropout") and len(node.inputs) >= 1 and can_bypass(graph, node):
                if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
                    continue  # the mask is used; not an inference no-op
                node.outputs = node.outputs[:1]
                bypass_node(graph, node)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        return PassResult(graph, removed > 0, [f"{removed} nodes removed"] if removed else [])
