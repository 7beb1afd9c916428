"""The pass interface: a pass takes a graph and returns it with a record of what it did.

After onnx-ir's pass infrastructure: one job per pass, a ``modified`` flag, and notes that say
which patterns were rewritten and which were refused and why, so ``inspect`` and the report can
show them without re-deriving anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import onnx_graphsurgeon as gs


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    notes: list[str] = field(default_factory=list)


class GraphPass(Protocol):
    name: str

    def __call__(self, graph: gs.Graph) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    modified: bool
    notes: list[str]


def run_passes(
    graph: gs.Graph,
    passes: Sequence[GraphPass],
    check: Callable[[gs.Graph, gs.Graph, str], None] | None = None,
) -> tuple[gs.Graph, list[PassRecord]]:
    """Run passes in order; ``check(before, after, pass_name)`` names the first pass that diverges."""
    records: list[PassRecord] = []
    for graph_pass in passes:
        before = graph.copy() if check is not None else None
        result = graph_pass(graph)
        graph = result.graph
        records.append(PassRecord(graph_pass.name, result.modified, list(result.notes)))
        if check is not None and result.modified:
            check(before, graph, graph_pass.name)
    return graph, records
