"""What each runtime turns into integer kernels: the facts the placement rules are built on.

onnxruntime CPU (its QDQ selectors, onnxruntime/core/optimizer/qdq_transformer/selectors_actions):
- DQ -> Conv -> Q becomes QLinearConv; it needs the weight per-channel on axis 0 and the output Q.
- DQ -> MatMul -> Q becomes QLinearMatMul; DQ -> Gemm -> Q becomes QGemm.
- DQ -> {Add, Mul, Concat, AveragePool, GlobalAveragePool, Sigmoid, LeakyRelu} -> Q become QLinear ops.
- Data-movement ops between DQ and Q with equal scale and zero point drop the pair and run on
  uint8 directly (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, MaxPool, Resize, Gather...).
- Relu and Clip before Q are removed when the Q range lies inside theirs (zero point at type min).
u8 activations with s8 weights: 3.5x faster than fp32 for a 3x3 conv on this CPU; s8 x s8 0.8x.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetRules:
    name: str
    # Ops computed in integer arithmetic from quantized inputs and a constant quantized weight.
    anchors: frozenset[str]
    # Ops with their own int8 kernel: worth keeping int8 when all their inputs already are.
    int8_ops: frozenset[str]
    # Ops that move uint8 data unchanged: their output shares the input's scale and zero point.
    passthrough_ops: frozenset[str]
    # Activations folded into the producer's output range instead of getting their own Q/DQ.
    absorbed_activations: frozenset[str]
    signed_activations: bool
    symmetric_activations: bool


ORT_CPU = TargetRules(
    name="ort-cpu",
    anchors=frozenset({"Conv", "Gemm", "MatMul"}),
    int8_ops=frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}),
    passthrough_ops=frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize"}),
    absorbed_activations=frozenset({"Relu", "Clip"}),
    signed_activations=False,
    symmetric_activations=False,
)

TENSORRT = TargetRules(
    name="tensorrt",
    anchors=frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"}),
    int8_ops=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool"}),
    passthrough_ops=frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}),
    absorbed_activations=frozenset({"Relu", "Clip"}),
    signed_activations=True,
    symmetric_activations=True,
)

TARGETS = {rules.name: rules for rules in (ORT_CPU, TENSORRT)}
