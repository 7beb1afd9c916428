"""Clustered weights (search/clustering.py) in the graph: decoded for the simulation, stored as codebooks.

Two passes, because the rest of the pipeline must see the clustered weight as an ordinary int8 one:

1. ``ClusterWeights`` (before InsertQDQ) replaces each clustered layer's float weight by its decoded
   codebook weight, so the weight QuantizeLinear (at the codebook's scale) reproduces the codebook
   integers exactly and bias correction measures the weights that will run.
2. ``EmitCodebookWeights`` (after FoldWeightQuantizers and QuantizeBias, which read the weight
   DequantizeLinear's constant input) swaps that int8 constant for
   ``Reshape(GatherElements(codebook int8 [C, 2^b], Cast(indices uint8 [C, N] -> int64), axis=1))``
   (plus a Transpose when the channel axis is not the first). GatherElements takes only int32/int64
   indices, hence the Cast; the indices are stored as uint8.

onnxruntime 1.32 (CPU, ORT_ENABLE_ALL) constant-folds the Cast/GatherElements/Reshape chain at session
start, before its QDQ fusions, which then make QLinearConv/QGemm as for a plain int8 weight. Measured
at W4A8 (1 thread, 64 images, min of 30): zoo/repvgg optimizes to the 9 QLinearConv + 1 QGemm of its
8-bit model, no GatherElements left, and runs in 7.9 ms against 8.1 ms for int8 weights; mobileone
17 QLinearConv + 1 QGemm, 2.03 ms against 1.98. The folding costs at load: session start 20 ms
against 10 (repvgg). tests/emit/test_codebook.py checks the optimized graph. Left alone: a node whose
weight DequantizeLinear has no constant int8 input (nothing was folded there).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, producer
from ..passes.base import PassResult
from ..search.clustering import Codebook, cluster_weight
from ..search.quant_grid import IntGrid


class ClusterWeights:
    """Replace the weight of each named node by its codebook-decoded float values."""

    name = "cluster_weights"

    def __init__(self, codebooks: dict[str, Codebook], input_index: dict[str, int]):
        self.codebooks = codebooks
        self.input_index = input_index

    def __call__(self, graph: gs.Graph) -> PassResult:
        for node in graph.nodes:
            if node.name in self.codebooks:
                index = self.input_index[node.name]
                decoded = self.codebooks[node.name].decode()
                node.inputs[index] = gs.Constant(f"{node.inputs[index].name}_clustered", decoded)
        entries = sorted({book.levels.shape[1] for book in self.codebooks.values()})
        return PassResult(graph, bool(self.codebooks), [
            f"{len(self.codebooks)} weights clustered to per-channel codebooks of {'/'.join(map(str, entries))}"
            " int8 entries"] if self.codebooks else [])


class EmitCodebookWeights:
    """Store each named node's folded int8 weight as uint8 indices into per-channel int8 codebooks."""

    name = "emit_codebook_weights"

    def __init__(self, codebooks: dict[str, Codebook]):
        self.codebooks = codebooks

    def __call__(self, graph: gs.Graph) -> PassResult:
        emitted = 0
        for node in list(graph.nodes):
            book = self.codebooks.get(node.name)
            dequantize = _weight_dequantize(node) if book is not None else None
            if dequantize is None:
                continue
            folded = constant_value(dequantize.inputs[0])
            if not np.array_equal(np.moveaxis(folded, book.axis, 0).reshape(book.indices.shape), book.integers):
                raise RuntimeError(f"{node.name}: the folded weight is not the codebook's (a pass changed it)")
            dequantize.inputs[0] = _decode_chain(graph, f"{node.name}_weight", book)
            emitted += 1
        graph.cleanup().toposort()
        return PassResult(graph, emitted > 0, [f"{emitted} weights stored as codebook indices"] if emitted else [])


def _weight_dequantize(node: gs.Node):
    """The DequantizeLinear feeding ``node`` a constant int8 weight, if any."""
    for tensor in node.inputs:
        source = producer(tensor)
        if source is not None and source.op == "DequantizeLinear":
            value = constant_value(source.inputs[0])
            if value is not None and value.dtype == np.int8:
                return source
    return None


def _decode_chain(graph: gs.Graph, base: str, book: Codebook) -> gs.Variable:
    wide = gs.Variable(f"{base}_codebook_indices_int64", dtype=np.int64)
    graph.layer(op="Cast", name=f"{base}_CodebookCast", attrs={"to": 7},   # 7: TensorProto.INT64
                inputs=[gs.Constant(f"{base}_codebook_indices", book.indices)], outputs=[wide])
    rows = gs.Variable(f"{base}_codebook_rows", dtype=np.int8)
    graph.layer(op="GatherElements", name=f"{base}_CodebookGather", attrs={"axis": 1},
                inputs=[gs.Constant(f"{base}_codebook", book.levels), wide], outputs=[rows])
    moved = [book.shape[book.axis]] + [d for i, d in enumerate(book.shape) if i != book.axis]
    shaped = gs.Variable(f"{base}_codebook_decoded", dtype=np.int8)
    graph.layer(op="Reshape", name=f"{base}_CodebookReshape", outputs=[shaped],
                inputs=[rows, gs.Constant(f"{base}_codebook_shape", np.array(moved, np.int64))])
    if book.axis == 0:
        return shaped
    restored = gs.Variable(f"{base}_codebook_transposed", dtype=np.int8)
    perm = list(range(1, book.axis + 1)) + [0] + list(range(book.axis + 1, len(book.shape)))
    graph.layer(op="Transpose", name=f"{base}_CodebookTranspose", attrs={"perm": perm},
                inputs=[shaped], outputs=[restored])
    return restored


def build_codebooks(graph, plan, weight_params, widths, container: IntGrid) -> dict[str, Codebook]:
    """Per-channel k-means codebooks at each layer's width, started from its uniform quantization and
    held on ``container``, the grid 8-bit weights get here (so they cannot saturate u8 x s8 pairs).
    A width with as many entries as the container has levels stays plain int8: nothing to choose."""
    nodes = {node.name: node for node in graph.nodes}
    return {slot.node: cluster_weight(nodes[slot.node].inputs[slot.input_index].values, slot.axis,
                                      weight_params[slot.node].scale, weight_params[slot.node].grid,
                                      widths[slot.node], container)
            for slot in plan.weights if 2 ** widths[slot.node] < container.levels + 1}
