"""Give the float constant operand of a quantized Add/Mul its own DequantizeLinear.

onnxruntime CPU's QDQ selector turns DQ -> {Add, Mul} -> Q into QLinearAdd/QLinearMul only when
every input comes from a DequantizeLinear; a plain float initializer as the second operand (the
"learnable affine" y = s * x + b of PP-LCNet, a scalar scale) keeps the op in float, with a DQ
before and a Q after it: a float pass over the whole feature map plus two conversions.

A constant whose elements are all equal is exact on the activation's uint8 grid, so this costs no
accuracy: c > 0 is q = 1, zero point 0, scale c; c < 0 is q = 0, zero point 1, scale |c|; c == 0 is
q = zero point = 0, scale 1. Each decodes to c bit for bit ((q - zp) * scale with q - zp = +-1).
A constant with differing elements needs a real, lossy quantization. An offset that equalization
across a learnable affine made per-channel (passes/equalize.py) goes on the finest uint8 grid that
holds it, within half a step (offset_encoding): left float, PP-OCRv4 rec's 13 such Adds made its
`--fast` model 15% slower (BENCHMARKS.md, session 13). A bias added to a MatMul/Gemm/Conv output stays
float, where bias correction can still move it; so does a multiplied constant, whose node stays as it was.

Runs right after InsertQDQ, so block reconstruction and bias correction see the graph the runtime
will run; the new DQ reads only constants, which the torch executor folds like a weight's DQ.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.patterns import producer
from ..passes.base import PassResult

# Binary ops whose QDQ selector wants a DequantizeLinear on every input (QLinearAdd / QLinearMul).
_BINARY = ("Add", "Mul")


class QuantizeConstantOperands:
    """Put ``DequantizeLinear(uint8 constant)`` in place of an all-equal float operand of a quantized Add/Mul."""

    name = "quantize_constant_operands"

    def __init__(self, int8_ops: Iterable[str]):
        self.ops = frozenset(int8_ops) & frozenset(_BINARY)

    def __call__(self, graph: gs.Graph) -> PassResult:
        done, skipped, rounded, worst = 0, 0, 0, 0.0
        for node in list(graph.nodes):
            if node.op not in self.ops or len(node.inputs) != 2 or not _quantized_output(node):
                continue
            constants = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
            if len(constants) != 1:
                continue
            index = constants[0]
            activation_type = _dequantized_type(node.inputs[1 - index])
            values = np.asarray(node.inputs[index].values)
            if activation_type is None or values.dtype != np.float32 or values.size == 0:
                continue
            encoded = exact_encoding(values, activation_type)
            if encoded is None and node.op == "Add" and not _layer_output(node.inputs[1 - index]):
                encoded = offset_encoding(values, activation_type)
                if encoded is not None:
                    rounded += 1
                    worst = max(worst, float(np.max(np.abs(_decode(*encoded) - values))))
            if encoded is None:
                skipped += 1
                continue
            quantized, scale, zero_point = encoded
            base = f"{node.name}_constant{index}"
            restored = gs.Variable(f"{base}_dequantized", dtype=np.float32)
            graph.layer(op="DequantizeLinear", name=f"{base}_DequantizeLinear", outputs=[restored],
                        inputs=[gs.Constant(f"{base}_quantized", quantized), gs.Constant(f"{base}_scale", scale),
                                gs.Constant(f"{base}_zero_point", zero_point)])
            node.inputs = [restored if i == index else t for i, t in enumerate(node.inputs)]
            done += 1
        graph.cleanup().toposort()
        notes = [f"{done} constant operands of Add/Mul stored as exact uint8 behind a DequantizeLinear"] if done else []
        if rounded:
            notes.append(f"{rounded} of them per-channel offsets rounded to a uint8 grid (largest error {worst:.3g})")
        if skipped:
            notes.append(f"{skipped} non-uniform constant operands left float (not exact on a per-tensor grid)")
        return PassResult(graph, done > 0, notes)


def exact_encoding(values: np.ndarray, dtype) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(q, scale, zero point) with (q - zero point) * scale == values exactly, or None when the
    elements differ. ``dtype`` is the activation's integer type (uint8 on onnxruntime CPU)."""
    flat = values.reshape(-1)
    c = flat[0]
    if not np.all(flat == c) or not np.isfinite(c):
        return None
    dtype = np.dtype(dtype)
    low = np.iinfo(dtype).min   # 0 for uint8, -128 for int8: both leave room for q - zp = +-1
    if c > 0:
        q, zero_point, scale = low + 1, low, c
    elif c < 0:
        q, zero_point, scale = low, low + 1, -c
    else:
        q, zero_point, scale = low, low, np.float32(1)
    return (np.full(values.shape, q, dtype), np.array(scale, np.float32), np.array(zero_point, dtype))


def offset_encoding(values: np.ndarray, dtype) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(q, scale, zero point) on the finest grid of ``dtype`` that holds every value and zero.

    Lossy, at most half a step. Only for an added constant: its step is at most the Add output's
    (that output's range holds the offsets), so the error stays under half an output step, where
    a float Add would cost a pass over the map (PP-OCRv4 rec after equalization: 13 of them, 15%).
    """
    flat = values.reshape(-1).astype(np.float64)
    if not np.all(np.isfinite(flat)):
        return None
    info = np.iinfo(np.dtype(dtype))
    low, high = min(flat.min(), 0.0), max(flat.max(), 0.0)
    scale = (high - low) / (info.max - info.min)
    if scale <= 0:
        return None
    zero_point = int(np.clip(np.round(info.min - low / scale), info.min, info.max))
    quantized = np.clip(np.round(flat / scale) + zero_point, info.min, info.max)
    return (quantized.reshape(values.shape).astype(dtype), np.array(scale, np.float32),
            np.array(zero_point, dtype))


def _layer_output(tensor: gs.Tensor) -> bool:
    """The tensor is a MatMul/Gemm/Conv output behind QuantizeLinear -> DequantizeLinear: its added
    constant is a bias."""
    node = producer(tensor)
    for _ in range(2):
        if node is None or node.op not in ("DequantizeLinear", "QuantizeLinear"):
            return False
        node = producer(node.inputs[0])
    return node is not None and node.op in ("MatMul", "Gemm", "Conv")


def _decode(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    return (quantized.astype(np.float64) - float(zero_point)) * float(scale)


def _dequantized_type(tensor: gs.Tensor):
    """The integer type of the DequantizeLinear that produces ``tensor`` (per-tensor only), else None."""
    node = producer(tensor)
    if node is None or node.op != "DequantizeLinear" or len(node.inputs) < 2:
        return None
    scale = node.inputs[1]
    if isinstance(scale, gs.Constant) and np.asarray(scale.values).size != 1:
        return None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = np.asarray(zero_point.values).dtype if isinstance(zero_point, gs.Constant) else node.inputs[0].dtype
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    return dtype if dtype in (np.dtype(np.uint8), np.dtype(np.int8)) else None


def _quantized_output(node: gs.Node) -> bool:
    """The output goes only to QuantizeLinear: the pattern onnxruntime fuses (DQ -> op -> Q)."""
    consumers = node.outputs[0].outputs if node.outputs else []
    return len(consumers) > 0 and all(c.op == "QuantizeLinear" for c in consumers)
