"""Partition a graph into reconstruction blocks and stages, from its structure alone.

Blocks (the unit of block-wise reconstruction, UWC arXiv 2201.06376) hold a few adjacent weight
layers and never cut a single-entry/single-exit region that fits the layer budget, so a residual
unit is learned whole against its own float output. Stages are runs of blocks at one spatial
resolution (a new stage starts where a strided conv, a pool or a resize changes H, W); runs
without a spatial layout (token sequences) become stages of ``blocks_per_stage`` blocks.
Nodes that read only constants (a weight's QuantizeLinear/DequantizeLinear, shape arithmetic on
initializers) go with the block of their first consumer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import onnx
import onnx_graphsurgeon as gs

from ..errors import UserError
from .executor import topological_order
from .regions import NodeIndex, cut_at_articulations, pack, refine

Shape = tuple


@dataclass
class Block:
    name: str
    nodes: list[str]             # node names, in topological order
    inputs: list[str]            # non-constant tensors read from outside the block
    outputs: list[str]           # tensors used after the block or returned by the graph
    weight_layers: list[str]     # Conv/ConvTranspose/Gemm/MatMul nodes with a constant weight


@dataclass
class Stage:
    name: str
    blocks: list[Block] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


_RESAMPLING = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")


def partition(graph: gs.Graph, shapes: Optional[dict[str, Shape]] = None, max_layers_per_block: int = 4,
              blocks_per_stage: int = 4) -> list[Stage]:
    """Stages of blocks covering every node of ``graph`` once, in topological order.

    ``shapes`` (tensor name -> shape) decides where the resolution changes; without it onnx shape
    inference is tried, and where shapes stay unknown a strided window op or a Resize counts as a
    change. Unnamed nodes are named ``<op>_<position>`` in place, since blocks list node names.
    """
    if max_layers_per_block < 1 or blocks_per_stage < 1:
        raise UserError("max layers per block and blocks per stage must be at least 1")
    _name_nodes(graph)
    nodes = topological_order(list(graph.nodes))
    constant_only = _constant_only(nodes)
    index = NodeIndex.of([n for n in nodes if id(n) not in constant_only], {t.name for t in graph.outputs})
    known = _known_shapes(graph, shapes)
    regions = [piece for region in cut_at_articulations(index, index.nodes)
               for piece in refine(index, region, max_layers_per_block)]
    stages_of_nodes: list[list[list[gs.Node]]] = []
    for run, spatial in _resolution_runs(index, regions, known):
        blocks = pack(run, index.layer_count, max_layers_per_block)
        step = len(blocks) if spatial else blocks_per_stage
        stages_of_nodes.extend(blocks[i:i + step] for i in range(0, len(blocks), step))
    _attach_constant_nodes(nodes, constant_only, stages_of_nodes)
    return _describe(index, stages_of_nodes)


def _name_nodes(graph: gs.Graph) -> None:
    seen: set[str] = set()
    for position, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"{node.op}_{position}"
        if node.name in seen:
            raise UserError(f"two nodes are named {node.name!r}; blocks refer to nodes by name")
        seen.add(node.name)


def _constant_only(nodes: list[gs.Node]) -> set[int]:
    """Nodes whose every input is a constant or comes from such nodes (not from a graph input)."""
    found: set[int] = set()
    for node in nodes:
        if node.inputs and all(isinstance(t, gs.Constant) or not t.name or (t.inputs and id(t.inputs[0]) in found)
                               for t in node.inputs):
            found.add(id(node))
        elif not node.inputs:   # Constant, ConstantOfShape without inputs
            found.add(id(node))
    return found


def _known_shapes(graph: gs.Graph, shapes: Optional[dict[str, Shape]]) -> dict[str, Shape]:
    if shapes is not None:
        return dict(shapes)
    known = {t.name: tuple(t.shape) for t in graph.tensors().values() if t.shape is not None}
    try:
        inferred = onnx.shape_inference.infer_shapes(gs.export_onnx(graph))
    except Exception:   # shape inference is a hint here; the structural rule covers its absence
        return known
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        known[info.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims)
    return known


def _output_shape(region: list[gs.Node], known: dict[str, Shape]) -> Optional[Shape]:
    """Shape of the region's main output (its last node's first), None when unknown."""
    return known.get(region[-1].outputs[0].name)


def _changes_resolution(region: list[gs.Node], key, previous_key) -> bool:
    """Known spatial sizes decide; with symbolic or missing ones (dynamic H, W), a strided window
    op or a Resize inside the region is taken as the change."""
    concrete = all(isinstance(d, int) and d > 0 for d in (key or ()) + (previous_key or ()))
    if key is not None and previous_key is not None and concrete:
        return key != previous_key
    for node in region:
        if node.op == "Resize" or (node.op in _RESAMPLING and any(s > 1 for s in node.attrs.get("strides", []))):
            return True
    return False


def _resolution_runs(index: NodeIndex, regions: list[list[gs.Node]], known: dict[str, Shape]):
    """Regions grouped into runs at one resolution: (regions, is_spatial).

    Regions of unknown shape continue the layout before them; when the next known shape shows a
    change, the unknown ones just before it move to the new run with it, since the change
    happened somewhere among them (usually in the strided conv whose output was not listed).
    """
    runs: list[tuple[list[list[gs.Node]], bool]] = []
    previous_key, spatial, unknown_tail = None, True, 0
    for region in regions:
        shape = _output_shape(region, known)
        spatial = len(shape) >= 4 if shape is not None else spatial   # rank < 4: a token sequence
        key = tuple(shape[2:]) if shape is not None and spatial else None
        if not runs or runs[-1][1] != spatial or (spatial and _changes_resolution(region, key, previous_key)):
            carried: list[list[gs.Node]] = []
            if runs and shape is not None and unknown_tail:
                carried = runs[-1][0][-unknown_tail:]
                del runs[-1][0][-unknown_tail:]
            runs.append((carried, spatial))
        runs[-1][0].append(region)
        unknown_tail = unknown_tail + 1 if shape is None else 0
        previous_key = key if shape is not None else previous_key
    return _merge_weightless(index, [run for run in runs if run[0]])


def _merge_weightless(index: NodeIndex, runs):
    """A run without weight layers (a reshape between conv and sequence parts) joins its neighbour."""
    merged: list[tuple[list[list[gs.Node]], bool]] = []
    for regions, spatial in runs:
        if merged and not any(index.layer_count(region) for region in regions):
            merged[-1][0].extend(regions)
        elif merged and not any(index.layer_count(region) for region in merged[-1][0]):
            merged[-1] = (merged[-1][0] + regions, spatial)
        else:
            merged.append((list(regions), spatial))
    return merged


def _attach_constant_nodes(nodes: list[gs.Node], constant_only: set[int],
                           stages: list[list[list[gs.Node]]]) -> None:
    """Put each constant-only node in the earliest block that consumes it, keeping topological order."""
    blocks = [block for stage in stages for block in stage]
    if not blocks:   # nothing but constants: one block holds them all
        blocks.append([])
        stages.append([blocks[0]])
    block_number = {id(node): i for i, block in enumerate(blocks) for node in block}
    for node in reversed(nodes):   # consumers first, so a chain of constant nodes follows its end
        if id(node) in constant_only:
            consumers = [block_number[id(c)] for t in node.outputs for c in t.outputs if id(c) in block_number]
            block_number[id(node)] = min(consumers, default=0)
            blocks[block_number[id(node)]].append(node)
    order = {id(n): i for i, n in enumerate(nodes)}
    for block in blocks:
        block.sort(key=lambda n: order[id(n)])


def _boundary(nodes: list[gs.Node], graph_outputs: set[str]) -> tuple[list[str], list[str]]:
    """Non-constant tensors read from outside ``nodes``, and tensors of theirs used outside."""
    members = {id(n) for n in nodes}
    produced = {t.name for n in nodes for t in n.outputs}
    inputs: dict[str, None] = {}
    outputs: dict[str, None] = {}
    for node in nodes:
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in produced:
                inputs[tensor.name] = None
        for tensor in node.outputs:
            if tensor.name in graph_outputs or any(id(c) not in members for c in tensor.outputs):
                outputs[tensor.name] = None
    return list(inputs), list(outputs)


def _describe(index: NodeIndex, stages_of_nodes: list[list[list[gs.Node]]]) -> list[Stage]:
    stages: list[Stage] = []
    count = 0
    for stage_number, stage_blocks in enumerate(stages_of_nodes):
        stage = Stage(f"stage{stage_number}")
        for block_nodes in stage_blocks:
            inputs, outputs = _boundary(block_nodes, index.graph_outputs)
            layers = [n.name for n in block_nodes if index.is_weight_layer(n)]
            stage.blocks.append(Block(f"block{count}", [n.name for n in block_nodes], inputs, outputs, layers))
            count += 1
        stage.inputs, stage.outputs = _boundary([n for b in stage_blocks for n in b], index.graph_outputs)
        stages.append(stage)
    return stages
