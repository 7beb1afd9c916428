"""Single-entry/single-exit regions of a node set, and their refinement to a layer budget.

A region is cut at its articulation nodes (the nodes every path through it passes): what lies
between two of them has one way in and one way out, so a residual unit, a re-parameterized
multi-branch block or an attention block with its skip connection is never cut in the middle.
A region holding more weight layers than the budget is opened one level: without its exit node
(the join of a residual unit) its branch usually becomes a chain that can be cut in turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import onnx_graphsurgeon as gs

from .dominators import articulation_vertices

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class NodeIndex:
    """The computation's nodes in topological order, with the edges that matter for cutting."""
    nodes: list[gs.Node]
    position: dict[int, int]            # id(node) -> index in ``nodes``
    graph_outputs: set[str]

    @classmethod
    def of(cls, nodes: list[gs.Node], graph_outputs: set[str]) -> "NodeIndex":
        return cls(nodes, {id(n): i for i, n in enumerate(nodes)}, graph_outputs)

    def producers(self, node: gs.Node) -> list[gs.Node]:
        return [t.inputs[0] for t in node.inputs if t.inputs and id(t.inputs[0]) in self.position]

    def consumers(self, node: gs.Node) -> list[gs.Node]:
        return [c for t in node.outputs for c in t.outputs if id(c) in self.position]

    def is_weight_layer(self, node: gs.Node) -> bool:
        return node.op in WEIGHT_OPS and any(_reads_constant(t) for t in node.inputs[1:2])

    def layer_count(self, nodes: Sequence[gs.Node]) -> int:
        return sum(self.is_weight_layer(n) for n in nodes)


def _reads_constant(tensor: gs.Tensor) -> bool:
    """A constant, possibly behind QuantizeLinear/DequantizeLinear/Transpose (a simulated weight)."""
    while not isinstance(tensor, gs.Constant):
        if not tensor.inputs or tensor.inputs[0].op not in ("QuantizeLinear", "DequantizeLinear", "Transpose",
                                                            "Identity", "Cast"):
            return False
        tensor = tensor.inputs[0].inputs[0]
    return True


def cut_at_articulations(index: NodeIndex, nodes: Sequence[gs.Node]) -> list[list[gs.Node]]:
    """Split ``nodes`` (topologically ordered) after each articulation node."""
    if not nodes:
        return []
    members = {id(n): i + 1 for i, n in enumerate(nodes)}
    entry, exit_ = 0, len(nodes) + 1
    predecessors: list[list[int]] = [[] for _ in range(len(nodes) + 2)]
    for i, node in enumerate(nodes, start=1):
        inside = sorted({members[id(p)] for p in index.producers(node) if id(p) in members})
        # a producer outside the index computes only from constants (a weight's DequantizeLinear):
        # not an entry into the region, or no node of a QDQ graph would ever be an articulation
        reads_outside = any(not t.inputs or (id(t.inputs[0]) in index.position and id(t.inputs[0]) not in members)
                            for t in node.inputs if not isinstance(t, gs.Constant) and t.name)
        predecessors[i] = ([entry] if reads_outside or not inside else []) + inside
        if _leaves(index, node, members):
            predecessors[exit_].append(i)
    cuts = articulation_vertices(predecessors)
    pieces, start = [], 0
    for vertex in cuts:
        pieces.append(list(nodes[start:vertex]))
        start = vertex
    pieces.append(list(nodes[start:]))
    return [p for p in pieces if p]


def _leaves(index: NodeIndex, node: gs.Node, members: dict[int, int]) -> bool:
    """Whether ``node`` feeds something outside ``members`` (or nothing at all)."""
    outside = [c for t in node.outputs for c in t.outputs if id(c) not in members]
    return bool(outside) or any(t.name in index.graph_outputs for t in node.outputs) or not index.consumers(node)


def refine(index: NodeIndex, region: list[gs.Node], max_layers: int) -> list[list[gs.Node]]:
    """Regions of at most ``max_layers`` weight layers, cutting inside ``region`` only if it is larger."""
    if index.layer_count(region) <= max_layers or len(region) < 2:
        return [region]
    body, exit_node = region[:-1], region[-1]
    pieces = cut_at_articulations(index, body)
    if len(pieces) == 1:
        return _chunk(index, region, max_layers)
    refined = [sub for piece in pieces for sub in refine(index, piece, max_layers)]
    refined[-1].append(exit_node)
    return refined


def _chunk(index: NodeIndex, region: list[gs.Node], max_layers: int) -> list[list[gs.Node]]:
    """Last resort for parallel branches too big for one block: cut in order by layer count."""
    return pack([[n] for n in region], index.layer_count, max_layers)


def pack(pieces: list[list[gs.Node]], weight: Callable[[list[gs.Node]], int], max_layers: int) -> list[list[gs.Node]]:
    """Join adjacent pieces greedily while the layer count stays within ``max_layers``.

    A piece without weight layers joins its neighbour, so no block is only glue (activations,
    reshapes) that reconstruction could not learn anything in.
    """
    blocks: list[list[gs.Node]] = []
    count = 0
    for piece in pieces:
        layers = weight(piece)
        if blocks and (count + layers <= max_layers or layers == 0 or count == 0):
            blocks[-1].extend(piece)
            count += layers
        else:
            blocks.append(list(piece))
            count = layers
    return blocks
