"""Turn the simulation graph into what runtimes load: int8 weights, int32 biases.

Folding a QuantizeLinear on a constant uses the same round-half-to-even and saturation as the
runtime, so the folded graph computes exactly what the simulation graph did.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, producer
from ..passes.base import PassResult


class FoldWeightQuantizers:
    """Replace ``QuantizeLinear(constant)`` by its integer result."""

    name = "fold_weight_quantizers"

    def __call__(self, graph: gs.Graph) -> PassResult:
        folded = 0
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear":
                continue
            values = [constant_value(t) for t in node.inputs[:3]]
            if any(v is None for v in values):
                continue
            weight, scale, zero_point = values
            axis = int(node.attrs.get("axis", 1))
            shape = [1] * weight.ndim
            if scale.size > 1:
                shape[axis] = -1
            info = np.iinfo(zero_point.dtype)
            q = np.rint(weight.astype(np.float64) / scale.astype(np.float64).reshape(shape))
            q = np.clip(q + zero_point.astype(np.int64).reshape(shape), info.min, info.max).astype(zero_point.dtype)
            out = node.outputs[0]
            const = gs.Constant(out.name, q)
            for consumer in list(out.outputs):
                consumer.inputs = [const if inp is out else inp for inp in consumer.inputs]
            node.outputs = []
            folded += 1
        graph.cleanup()
        return PassResult(graph, folded > 0, [f"{folded} weight quantizers folded"] if folded else [])


class QuantizeBias:
    """Store Conv/Gemm biases as int32 with scale = input scale x weight scale, zero point 0.

    That is the form QLinearConv and QGemm take; a float bias would keep the node out of the
    integer kernel. The bias is clipped to int32; its rounding error is below 1/2 input x weight step.
    """

    name = "quantize_bias"

    def __call__(self, graph: gs.Graph) -> PassResult:
        done = 0
        for node in graph.nodes:
            if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
                continue
            bias = constant_value(node.inputs[2])
            input_scale = _dequantize_scale(node.inputs[0])
            weight_scale = _dequantize_scale(node.inputs[1], require_constant_input=True)
            if bias is None or input_scale is None or weight_scale is None or bias.dtype != np.float32:
                continue
            if input_scale.size != 1 or bias.ndim != 1 or weight_scale.size not in (1, bias.size):
                continue
            scale = (input_scale.astype(np.float64) * weight_scale.astype(np.float64)).reshape(-1)
            scale = np.broadcast_to(scale, bias.shape)
            quantized = np.clip(np.rint(bias / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
            base = f"{node.name}_bias"
            restored = gs.Variable(f"{base}_dequantized", dtype=np.float32)
            graph.layer(op="DequantizeLinear", name=f"{base}_DequantizeLinear",
                        inputs=[gs.Constant(f"{base}_quantized", quantized),
                                gs.Constant(f"{base}_scale", scale.astype(np.float32)),
                                gs.Constant(f"{base}_zero_point", np.zeros(bias.shape, np.int32))],
                        outputs=[restored], attrs={"axis": 0})
            node.inputs = [restored if i == 2 else inp for i, inp in enumerate(node.inputs)]
            done += 1
        graph.cleanup().toposort()
        return PassResult(graph, done > 0, [f"{done} biases stored as int32"] if done else [])


def _dequantize_scale(tensor: gs.Tensor, require_constant_input: bool = False):
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear":
        return None
    if require_constant_input and constant_value(node.inputs[0]) is None:
        return None
    return constant_value(node.inputs[1])
