"""Insert QuantizeLinear/DequantizeLinear as planned: the simulation graph.

Weights stay float behind a QuantizeLinear so that reconstruction can still see (and learn) the
float values; the emitter later folds those into int8 initializers. Each consumer of a quantized
activation gets its own DequantizeLinear: onnxruntime's QDQ selectors match a DQ that feeds one
node, and a shared DQ would keep a fan-out tensor (a residual) out of the integer kernels.

A grid narrower than its container (6-bit activations: 64 levels held in uint8) gets a Clip that
makes the runtime compute exactly the narrow arithmetic: on the quantized integers for onnxruntime
(its QDQ fusions survive it), or on the float tensor before the Q for TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..emit.placement import QuantPlan
from ..search.quant_grid import IntGrid
from .base import PassResult


@dataclass(frozen=True)
class ActivationQuant:
    scale: float
    zero_point: int
    grid: IntGrid


@dataclass(frozen=True)
class WeightQuant:
    scale: np.ndarray   # one per channel along ``axis``
    axis: int
    grid: IntGrid       # the signed integers the weight takes, whatever type stores them
    # 128: stored as uint8 with zero point 128 (emit/saturation.py: onnxruntime's u8 x u8 kernels
    # do not saturate where its u8 x s8 ones do); 0: stored in ``grid.dtype``
    zero_point: int = 0

    @property
    def storage_dtype(self) -> type:
        return np.uint8 if self.zero_point else self.grid.dtype


class InsertQDQ:
    """Put Q->DQ on every planned activation and Q->DQ behind every planned weight."""

    name = "insert_qdq"

    def __init__(self, plan: QuantPlan, activations: dict[str, ActivationQuant], weights: dict[str, WeightQuant],
                 narrow_clip: str = "integer"):
        if narrow_clip not in ("integer", "float"):
            raise ValueError(f"narrow_clip must be 'integer' or 'float', not {narrow_clip!r}")
        self.plan = plan
        self.activations = activations
        self.weights = weights
        self.narrow_clip = narrow_clip

    def __call__(self, graph: gs.Graph) -> PassResult:
        tensors = graph.tensors()
        nodes = {node.name: node for node in graph.nodes}
        for name in self.plan.activations:
            self._quantize_activation(graph, tensors[name], self.activations[self.plan.leader(name)])
        for slot in self.plan.weights:
            node = nodes[slot.node]
            self._quantize_weight(graph, node, slot.input_index, self.weights[slot.node])
        graph.toposort()
        notes = [f"{len(self.plan.activations)} activations and {len(self.plan.weights)} weights quantized"]
        return PassResult(graph, True, notes)

    def _quantize_activation(self, graph: gs.Graph, tensor: gs.Tensor, quant: ActivationQuant) -> None:
        consumers = list(tensor.outputs)
        scale = gs.Constant(f"{tensor.name}_scale", np.array(quant.scale, dtype=np.float32))
        zero_point = gs.Constant(f"{tensor.name}_zero_point", np.array(quant.zero_point, dtype=quant.grid.dtype))
        quantized = gs.Variable(f"{tensor.name}_quantized", dtype=quant.grid.dtype)
        source = tensor
        narrow = _is_narrow(quant.grid)
        if narrow and self.narrow_clip == "float":
            source = gs.Variable(f"{tensor.name}_clipped", dtype=np.float32)
            low, high = (np.float32((bound - quant.zero_point) * quant.scale)
                         for bound in (quant.grid.qmin, quant.grid.qmax))
            graph.layer(op="Clip", name=f"{tensor.name}_Clip", outputs=[source],
                        inputs=[tensor, gs.Constant(f"{tensor.name}_clip_min", np.array(low, np.float32)),
                                gs.Constant(f"{tensor.name}_clip_max", np.array(high, np.float32))])
        graph.layer(op="QuantizeLinear", name=f"{tensor.name}_QuantizeLinear",
                    inputs=[source, scale, zero_point], outputs=[quantized])
        if narrow and self.narrow_clip == "integer":
            saturated = quantized
            quantized = gs.Variable(f"{tensor.name}_quantized_narrow", dtype=quant.grid.dtype)
            graph.layer(op="Clip", name=f"{tensor.name}_QuantizedClip", outputs=[quantized], inputs=[
                saturated, gs.Constant(f"{tensor.name}_qmin", np.array(quant.grid.qmin, quant.grid.dtype)),
                gs.Constant(f"{tensor.name}_qmax", np.array(quant.grid.qmax, quant.grid.dtype))])
        for index, consumer in enumerate(consumers):
            restored = gs.Variable(f"{tensor.name}_dequantized_{index}", dtype=np.float32)
            graph.layer(op="DequantizeLinear", name=f"{tensor.name}_DequantizeLinear_{index}",
                        inputs=[quantized, scale, zero_point], outputs=[restored])
            consumer.inputs = [restored if inp is tensor else inp for inp in consumer.inputs]

    def _quantize_weight(self, graph: gs.Graph, node: gs.Node, index: int, quant: WeightQuant) -> None:
        base = f"{node.name}_weight"
        # Pre-clip to the grid: QuantizeLinear saturates to the storage type ([-128, 127]) while a
        # narrower grid ([-127, 127], or [-31, 31] at 6 bits) is what the emitter will store.
        shape = [1] * node.inputs[index].values.ndim
        shape[quant.axis] = -1
        limit = (quant.scale.astype(np.float64) * min(quant.grid.qmax, -quant.grid.qmin)).reshape(shape)
        clipped = np.clip(node.inputs[index].values, -limit, limit).astype(np.float32)
        weight = gs.Constant(f"{base}_float", clipped)
        scale = gs.Constant(f"{base}_scale", quant.scale.astype(np.float32))
        zero_point = gs.Constant(f"{base}_zero_point",
                                 np.full(quant.scale.shape, quant.zero_point, dtype=quant.storage_dtype))
        quantized = gs.Variable(f"{base}_quantized", dtype=quant.storage_dtype)
        restored = gs.Variable(f"{base}_dequantized", dtype=np.float32)
        attrs = {"axis": quant.axis}
        graph.layer(op="QuantizeLinear", name=f"{base}_QuantizeLinear", inputs=[weight, scale, zero_point],
                    outputs=[quantized], attrs=attrs)
        graph.layer(op="DequantizeLinear", name=f"{base}_DequantizeLinear", inputs=[quantized, scale, zero_point],
                    outputs=[restored], attrs=attrs)
        node.inputs = [restored if i == index else inp for i, inp in enumerate(node.inputs)]


def _is_narrow(grid: IntGrid) -> bool:
    """Below 8 bits: the container's saturation alone would leave levels the grid does not have."""
    return grid.levels < np.iinfo(grid.dtype).max - np.iinfo(grid.dtype).min - 1
