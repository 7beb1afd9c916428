"""True int4 weights for weight-only MatMul/Gemm on onnxruntime CPU (fused into MatMulNBits).

Why only MatMul/Gemm: onnxruntime has no int4 Conv kernel and dequantizes an int4 Conv weight on
every run (2.5x slower than fp32 in a test), so Conv keeps the int8 container with values in
[-7, 7]. For MatMul it has com.microsoft MatMulNBits: its QDQ transformer turns
``DequantizeLinear(int4 constant, axis 0, block_size) -> MatMul`` into one, which keeps the weight
in 4 bits and, at its default accuracy level 4, quantizes the float input to int8 per block of K
inside the kernel. So the layer's input gets no Q/DQ of ours: the layer is weight-only.

Fusion conditions, each checked on onnxruntime 1.32 (by experiment; the main ones by
tests/emit/test_int4_matmul.py):
- B is a 2-D constant behind one DequantizeLinear; block_size a power of two >= 16; a short last
  block is accepted (ceil(K / block) rows of scales, computed exactly); no zero point needed;
- A is float: with a DQ on A as well the int8 MatMul selectors take the node, and they refuse int4.
  Also when A comes through a Reshape/Transpose from a quantized tensor: onnxruntime's QDQ
  propagation moves that DQ down onto A (PP-OCRv4 rec: the attention output projections, the head);
- no QuantizeLinear right after the MatMul, nor after the bias Add onnxruntime folds into it
  (MatMul + Add[N] -> Gemm -> MatMulNBits): the selector wants no Q. Nor after a Reshape/Transpose
  behind it: onnxruntime's QDQ propagation first moves such a Q up to the MatMul;
- no lone Relu/Clip after it: the selector takes it for a clip to drop before a Q and refuses the
  group (and Gemm + Relu becomes FusedGemm first);
- Gemm: transA 0, alpha 1, and beta 1 with a bias of shape [N]; transB 1 is handled here by
  storing B transposed ([K, N]) and setting transB 0.
A layer that misses one keeps the int8 container (QLinearMatMul / QGemm, input quantized), and the
reason is recorded. Only the fast recipe takes this form: block reconstruction learns per-channel
weights with the layer's input quantized, which is another layer than this one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..graph.patterns import constant_value
from ..errors import ModelError
from ..passes.base import PassRecord, PassResult
from ..passes.opset import UpgradeOpset
from ..search.criteria import weight_scales
from ..search.quant_grid import IntGrid, weight_grid
from .placement import QuantPlan, plan_quantization
from .targets import TargetRules

INT4_OPSET = 21         # DequantizeLinear takes int4 and block_size from opset 21
INT4_IR_VERSION = 10    # the IR version that has the INT4 tensor type
PREFERRED_BLOCK = 32    # onnxruntime's quantizer default; 16 where K is a multiple of 16 but not 32
MAX_BITS = 4
# Ops a Q moves up through and a DQ down through before onnxruntime fuses anything (qdq_propagation.cc,
# CanNodePropagate, 1.32). Flatten is not one: a DQ before it stays there. Versions after 1.32 add
# Slice: PP-OCRv4 rec's qkv projections (-> Reshape -> Transpose -> Slice -> Q) would then stay unfused.
QDQ_PROPAGATION_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


@dataclass(frozen=True)
class Int4Weight:
    scale: np.ndarray   # [ceil(K / block), N]: one symmetric scale per block of K rows and column
    block: int
    grid: IntGrid       # the width's symmetric grid ([-7, 7] at 4 bits), held in int4

    def quantize(self, weight: np.ndarray) -> np.ndarray:
        """``weight`` [K, N] as integers on the grid, rounded half to even like QuantizeLinear."""
        q = np.rint(np.asarray(weight, np.float64) / self.expanded_scale(len(weight)))
        return np.clip(q, self.grid.qmin, self.grid.qmax).astype(np.int8)

    def expanded_scale(self, rows: int) -> np.ndarray:
        return np.repeat(self.scale.astype(np.float64), self.block, axis=0)[:rows]


@dataclass
class WeightOnlyPlan:
    plan: QuantPlan                 # the placement with these layers' inputs and outputs left float
    blocks: dict[str, int]          # node -> block size, for the layers that take the int4 form
    refused: dict[str, str]         # node -> why a <= 4-bit MatMul/Gemm keeps the int8 container


def block_size_for(k: int) -> Optional[int]:
    """32 where it divides K, else 16 where that does, else 32 with a short last block (K >= 32).

    onnxruntime's MLAS kernels take power-of-two blocks from 16; a short last block is valid ONNX
    (scales have ceil(K / block) rows) and onnxruntime 1.32 fuses and computes it exactly
    (PP-OCRv4 rec's K = 120 layers need it). Below 32 with no dividing block: no int4 form.
    """
    for block in (PREFERRED_BLOCK, 16):
        if k % block == 0:
            return block
    return PREFERRED_BLOCK if k >= PREFERRED_BLOCK else None


def matmul_weight(node: gs.Node) -> np.ndarray:
    """B as [K, N] (a Gemm with transB stores it [N, K])."""
    weight = constant_value(node.inputs[1])
    return weight.T if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else weight


def block_weight_scales(weight: np.ndarray, block: int, method: str, grid: IntGrid) -> np.ndarray:
    """Scales [ceil(K / block), N] for B [K, N]: the per-channel search run on each block's columns."""
    return np.stack([weight_scales(weight[start:start + block], 1, method, grid)
                     for start in range(0, len(weight), block)]).astype(np.float32)


def plan_weight_only(graph: gs.Graph, rules: TargetRules, float_tensors: set[str], keep_float: tuple[str, ...],
                     widths: Mapping[str, int]) -> WeightOnlyPlan:
    """Which <= 4-bit MatMul/Gemm layers take the int4 form, and the placement that goes with it.

    Leaving a layer's input and output float can leave a neighbour's demand in place (a quantized
    consumer of its output puts a Q right after it), so the placement is redone without the layers
    onnxruntime would then refuse, until none is refused.
    """
    nodes = {node.name: node for node in graph.nodes}
    blocks, refused = {}, {}
    for name, bits in widths.items():
        node = nodes[name]
        if bits > MAX_BITS or node.op not in rules.weight_only_int4:
            continue
        reason = _form_refusal(node)
        if reason:
            refused[name] = reason
        else:
            blocks[name] = block_size_for(len(matmul_weight(node)))
    while True:
        plan = plan_quantization(graph, rules, float_tensors, keep_float, weight_only=frozenset(blocks))
        planned = set(plan.activations)
        dropped = {name: reason for name in blocks
                   if (reason := _fusion_refusal(nodes[name], planned))}
        if not dropped:
            return WeightOnlyPlan(plan, blocks, refused)
        for name in dropped:
            del blocks[name]
        refused.update(dropped)


def _form_refusal(node: gs.Node) -> Optional[str]:
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return "weight is not a 2-D constant"
    if node.op == "Gemm":
        attrs = node.attrs
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1 (onnxruntime fuses only a plain Gemm)"
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_value(node.inputs[2])
            n = matmul_weight(node).shape[1]
            if float(attrs.get("beta", 1.0)) != 1.0 or bias is None or bias.shape != (n,):
                return "Gemm bias is not a constant [N] with beta 1"
    k = len(matmul_weight(node))
    if block_size_for(k) is None:
        return f"K = {k} has no int4 block (< 32 and not a multiple of 16)"
    return None


def _fusion_refusal(node: gs.Node, planned: Collection[str]) -> Optional[str]:
    source = node.inputs[0]
    while True:
        if source.name in planned:
            return ("its input is quantized, or comes through Reshape/Transpose from a quantized tensor"
                    " (a DQ on A hands it to the int8 selectors)")
        if len(source.inputs) != 1 or source.inputs[0].op not in QDQ_PROPAGATION_OPS:
            break
        source = source.inputs[0].inputs[0]
    outputs = [node.outputs[0]]
    bias_add = _bias_add(node)
    if bias_add is not None:
        outputs.append(bias_add.outputs[0])
    consumers = outputs[-1].outputs
    reached = list(outputs)
    for tensor in reached:   # grows: what Reshape/Transpose make of the output (a Q there moves up)
        reached += [out for consumer in tensor.outputs if consumer.op in QDQ_PROPAGATION_OPS
                    for out in consumer.outputs]
    if any(t.name in planned for t in reached):
        return "its output is quantized for a consumer (no MatMulNBits fusion before a QuantizeLinear)"
    if len(consumers) == 1 and consumers[0].op in ("Relu", "Clip"):
        return f"a lone {consumers[0].op} follows (onnxruntime's selector refuses the group)"
    return None


def _bias_add(node: gs.Node) -> Optional[gs.Node]:
    """The Add of a constant [N] that is a MatMul's only consumer: onnxruntime folds it in first."""
    consumers = node.outputs[0].outputs
    if node.op != "MatMul" or len(consumers) != 1 or consumers[0].op != "Add":
        return None
    other = [t for t in consumers[0].inputs if t is not node.outputs[0]]
    value = constant_value(other[0]) if len(other) == 1 else None
    n = node.inputs[1].shape[-1] if node.inputs[1].shape else None
    return consumers[0] if value is not None and value.size == n and value.shape[-1] == n else None


class StoreInt4Weights:
    """Give each planned MatMul/Gemm its weight as ``DequantizeLinear(integers [K, N], block scales)``.

    Runs on the float graph before InsertQDQ (which skips these weights): the graph then holds the
    final integers, so bias correction measures the layer as it will run. A Gemm with transB gets B
    transposed and transB 0. Leaves every other node alone; the graph must be at opset 21.
    The integers are held as int8 here and packed into int4 by ``pack_int4_initializers`` on the
    exported model: onnx-graphsurgeon writes a loaded int4 array one byte per value, which onnx rejects.
    """

    name = "store_int4_weights"

    def __init__(self, weights: Mapping[str, Int4Weight]):
        self.weights = dict(weights)
        self.initializers: list[str] = []   # what pack_int4_initializers must pack

    def __call__(self, graph: gs.Graph) -> PassResult:
        if self.weights and graph.opset < INT4_OPSET:
            raise ValueError(f"int4 weights need opset {INT4_OPSET}, the graph has {graph.opset}")
        nodes = {node.name: node for node in graph.nodes}
        for name, quant in self.weights.items():
            node = nodes[name]
            weight = matmul_weight(node)
            base = f"{name}_weight"
            restored = gs.Variable(f"{base}_dequantized", dtype=np.float32, shape=list(weight.shape))
            graph.layer(op="DequantizeLinear", name=f"{base}_DequantizeLinear", outputs=[restored],
                        inputs=[gs.Constant(f"{base}_int4", quant.quantize(weight)),
                                gs.Constant(f"{base}_block_scale", quant.scale.astype(np.float32))],
                        attrs={"axis": 0, "block_size": quant.block})
            self.initializers.append(f"{base}_int4")
            node.inputs[1] = restored
            if node.op == "Gemm":
                node.attrs["transB"] = 0
        graph.cleanup().toposort()
        blocks = sorted({q.block for q in self.weights.values()})
        notes = [f"{len(self.weights)} MatMul/Gemm weights stored as int4, blocks of"
                 f" {', '.join(map(str, blocks))} along K, inputs left float (MatMulNBits)"] if self.weights else []
        return PassResult(graph, bool(self.weights), notes)


def pack_int4_initializers(model: onnx.ModelProto, names: Collection[str]) -> int:
    """Store the named int8 initializers (values in [-8, 7]) as INT4, two per byte; returns how many."""
    names, packed = set(names), 0
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name in names and tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor)
            if values.min() < -8 or values.max() > 7:
                raise ValueError(f"{tensor.name} holds values outside int4")
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), tensor.name))
            packed += 1
    if packed:
        model.ir_version = max(model.ir_version, INT4_IR_VERSION)
    return packed


def storage_label(quant: Int4Weight) -> str:
    """The report's ``weight_storage`` for an int4 weight-only layer."""
    narrow = "" if quant.grid.qmax == 7 else f", values in [{quant.grid.qmin}, {quant.grid.qmax}]"
    return f"int4 weight-only, block {quant.block} (MatMulNBits){narrow}"


def weight_only_int4(graph: gs.Graph, plan: QuantPlan, widths: dict[str, int], rules: TargetRules, floats: set[str],
                     config, records: list[PassRecord]) -> tuple[gs.Graph, QuantPlan, dict[str, Int4Weight]]:
    """The <= 4-bit MatMul/Gemm layers stored as int4 with float inputs (the module above), with the
    placement that leaves their inputs float and the graph at opset 21; none where the upgrade fails.

    Fast recipe only: reconstruction learns per-channel weights behind a quantized input, so with
    ``fast=False`` these layers keep the int8 container (values in [-7, 7] at 4 bits).
    """
    chosen = plan_weight_only(graph, rules, floats, config.float_patterns, widths)
    notes = [f"{name} keeps the int8 container: {reason}" for name, reason in chosen.refused.items()]
    if chosen.blocks:
        try:
            upgraded = UpgradeOpset(INT4_OPSET)(graph)
        except ModelError as exc:
            records.append(PassRecord("int4_weight_only", False, [f"int8 containers kept: {exc}", *notes]))
            return graph, plan, {}
        graph, plan, notes = upgraded.graph, chosen.plan, upgraded.notes + notes
    nodes = {node.name: node for node in graph.nodes}
    int4 = {}
    for name, block in chosen.blocks.items():
        node, grid = nodes[name], weight_grid(widths[name])
        method = config.for_node(name, node.op).weight_scale_search
        int4[name] = Int4Weight(block_weight_scales(matmul_weight(node), block, method, grid), block, grid)
    if int4 or notes:
        records.append(PassRecord("int4_weight_only", bool(int4), [
            f"{len(int4)} MatMul/Gemm layers as int4 weight-only (MatMulNBits)", *notes]))
    return graph, plan, int4
