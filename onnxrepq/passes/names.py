"""Give every node a unique name: plans, reports and recipe overrides refer to nodes by name."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import PassResult


class NameNodes:
    """Name unnamed nodes after their first output and make duplicate names unique."""

    name = "name_nodes"

    def __call__(self, graph: gs.Graph) -> PassResult:
        seen: set[str] = set()
        renamed = 0
        for index, node in enumerate(graph.nodes):
            base = node.name or (node.outputs[0].name if node.outputs else f"{node.op}_{index}")
            name, suffix = base, 1
            while name in seen:
                name, suffix = f"{base}_{suffix}", suffix + 1
            if name != node.name:
                node.name = name
                renamed += 1
            seen.add(name)
        return PassResult(graph, renamed > 0, [f"{renamed} nodes named"] if renamed else [])
