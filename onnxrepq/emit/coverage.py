"""Which compute ops onnxruntime CPU actually runs as integer kernels, read from its optimized graph.

The QDQ graph we write is only a request: onnxruntime's QDQ selectors turn DQ -> op -> Q into an
integer kernel when the pattern matches, and leave the float op with its Q/DQ round trip when it
does not. The only reliable check is to ask onnxruntime for the graph it will run
(``SessionOptions.optimized_model_filepath`` at ORT_ENABLE_ALL) and count what is in it.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter, deque
from dataclasses import dataclass

import onnx
import onnxruntime as ort

# Compute kernels on integer data, by op type (ONNX domain and com.microsoft, NHWC variants included).
INTEGER_KERNELS = frozenset({
    "QLinearConv", "NhwcQLinearConv", "QLinearConvTranspose", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "DynamicQuantizeLSTM", "QAttention",
    "MatMulNBits",   # int4 weights; at its default accuracy level 4 the input is quantized to int8 inside
})
# The same computations left in float (NCHWc's Conv keeps the op type "Conv" in com.microsoft.nchwc).
FLOAT_COMPUTE = frozenset({
    "Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
})


@dataclass
class KernelCoverage:
    integer_kernels: dict[str, int]   # integer compute kernels in the optimized graph, by op type
    float_compute: dict[str, int]     # conv/matmul/gemm left in float, by op type
    float_islands: dict[str, int]     # float ops on a path DequantizeLinear -> ... -> QuantizeLinear
    quantize_nodes: int
    dequantize_nodes: int
    transposes: int
    coverage: float                   # integer kernels / all conv, matmul and gemm kernels

    def summary(self) -> str:
        def counts(values: dict[str, int]) -> str:
            return ", ".join(f"{op} {n}" for op, n in values.items()) or "none"
        return "\n".join([
            f"integer kernels: {counts(self.integer_kernels)}",
            f"float compute: {counts(self.float_compute)}",
            f"float islands: {counts(self.float_islands)}",
            f"QuantizeLinear {self.quantize_nodes}, DequantizeLinear {self.dequantize_nodes},"
            f" Transpose {self.transposes}; coverage {self.coverage:.1%}",
        ])


def optimized_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime CPU runs for ``model`` after all its graph optimizations."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def kernel_coverage(model: onnx.ModelProto) -> KernelCoverage:
    """Count integer and float compute kernels in what onnxruntime CPU makes of ``model``."""
    graph = optimized_model(model).graph
    ops = Counter(node.op_type for node in graph.node)
    integer = {op: n for op, n in _ranked(ops) if op in INTEGER_KERNELS}
    floats = {op: n for op, n in _ranked(ops) if op in FLOAT_COMPUTE}
    total = sum(integer.values()) + sum(floats.values())
    return KernelCoverage(
        integer_kernels=integer,
        float_compute=floats,
        float_islands=dict(_ranked(Counter(node.op_type for node in float_islands(graph)))),
        quantize_nodes=ops["QuantizeLinear"],
        dequantize_nodes=ops["DequantizeLinear"],
        transposes=ops["Transpose"],
        coverage=sum(integer.values()) / total if total else 0.0,
    )


def float_islands(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Float nodes that sit between integer data: reached from a DequantizeLinear and reaching a
    QuantizeLinear through float nodes only (each one pays a dequantize/quantize round trip)."""
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
        for name in node.output:
            producer[name] = index
    nodes = graph.node
    is_float = [n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.op_type not in INTEGER_KERNELS
                for n in nodes]
    after_dq = _reach([i for i, n in enumerate(nodes) if n.op_type == "DequantizeLinear"],
                      lambda i: (c for out in nodes[i].output for c in consumers.get(out, ())), is_float)
    before_q = _reach([i for i, n in enumerate(nodes) if n.op_type == "QuantizeLinear"],
                      lambda i: (producer[name] for name in nodes[i].input if name in producer), is_float)
    return [nodes[i] for i in sorted(after_dq & before_q)]


def _reach(starts: list[int], neighbours, passable: list[bool]) -> set[int]:
    """Float nodes reachable from ``starts`` (not included) through float nodes."""
    seen: set[int] = set()
    queue = deque(starts)
    while queue:
        for nxt in neighbours(queue.popleft()):
            if passable[nxt] and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def _ranked(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
