"""Turn the simulation graph into what runtimes load: int8 weights, int32 biases.

Folding a QuantizeLinear on a constant uses the same round-half-to-even and saturation as the
runtime, so the folded graph computes exactly what the simulation graph did.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import constant_value, producer
from ..passes.base import PassResult

_INT32_MAX = 2 ** 31 - 1


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
    integer kernel. The rounding error is below 1/2 input x weight step. A channel whose weights
    are (almost) all zero, pruned in training (PP-OCRv4 rec has 56 at exactly 0 and a few at 1e-7),
    outputs about its bias alone on a vanishing weight step, and bias / step passes int32: such a
    channel's step is raised to the smallest that holds its bias, and its few integers re-rounded
    on it (at most half that step each, some 1e-8). Saturating instead moved such biases by up to
    1.7. A bias still past int32 (a per-tensor weight scale) stays float.
    """

    name = "quantize_bias"

    def __call__(self, graph: gs.Graph) -> PassResult:
        done, kept_float = 0, []
        for node in list(graph.nodes):
            if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3:
                continue
            bias = constant_value(node.inputs[2])
            input_scale = _dequantize_scale(node.inputs[0])
            weight_scale = _dequantize_scale(node.inputs[1], require_constant_input=True)
            if bias is None or input_scale is None or weight_scale is None or bias.dtype != np.float32:
                continue
            if input_scale.size != 1 or bias.ndim != 1 or weight_scale.size not in (1, bias.size):
                continue
            scale = np.broadcast_to((input_scale.astype(np.float64) * weight_scale.astype(np.float64)).reshape(-1),
                                    bias.shape)
            overflow = np.abs(np.rint(bias / scale)) > _INT32_MAX
            if overflow.any():
                scale = _widen_weight_steps(node, overflow, bias, input_scale)
                if scale is None:
                    kept_float.append(node.name)
                    continue
            quantized = np.rint(bias / scale).astype(np.int32)
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
        notes = [f"{done} biases stored as int32"] if done else []
        if kept_float:
            notes.append(f"{len(kept_float)} biases kept float, past int32 at any weight step: {', '.join(kept_float)}")
        return PassResult(graph, done > 0, notes)


def _widen_weight_steps(node: gs.Node, overflow: np.ndarray, bias: np.ndarray, input_scale: np.ndarray):
    """The bias scales after raising the overflowing channels' weight steps, or None where that cannot be done.

    The weight's DequantizeLinear gets its own integer and scale constants, so one shared with
    another node is not changed under it. A raised step only shrinks the integers, so they stay on
    the channel's grid.
    """
    dequantize = producer(node.inputs[1])
    integers, weight_scale = constant_value(dequantize.inputs[0]), constant_value(dequantize.inputs[1])
    zero_point = constant_value(dequantize.inputs[2]) if len(dequantize.inputs) > 2 else None
    axis = int(dequantize.attrs.get("axis", 1)) % integers.ndim
    offset = 0 if zero_point is None else int(zero_point.reshape(-1)[0])   # 128: uint8 storage
    if (weight_scale.size != bias.size or integers.shape[axis] != bias.size
            or (zero_point is not None and np.any(zero_point != offset))):
        return None
    old = weight_scale.astype(np.float64).reshape(-1)
    # 2^30: the bias lands near half the int32 reach, so the accumulator's sum stays inside it
    step = np.where(overflow, np.maximum(old, np.abs(bias) / (float(input_scale.reshape(())) * 2.0 ** 30)), old)
    step = step.astype(np.float32)
    scale = input_scale.astype(np.float64).reshape(()) * step.astype(np.float64)
    if np.any(np.abs(np.rint(bias / scale)) > _INT32_MAX):
        return None
    rows = np.moveaxis(integers, axis, 0).astype(np.float64) - offset
    ratio = (old / step.astype(np.float64)).reshape((-1,) + (1,) * (rows.ndim - 1))
    rows = np.where(overflow.reshape(ratio.shape), np.rint(rows * ratio), rows)
    dequantize.inputs[0] = gs.Constant(f"{dequantize.name}_integers_widened",
                                       (np.moveaxis(rows, 0, axis) + offset).astype(integers.dtype))
    dequantize.inputs[1] = gs.Constant(f"{dequantize.name}_scale_widened", step.reshape(weight_scale.shape))
    return scale


def _dequantize_scale(tensor: gs.Tensor, require_constant_input: bool = False):
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear":
        return None
    if require_constant_input and constant_value(node.inputs[0]) is None:
        return None
    return constant_value(node.inputs[1])
