"""What each runtime turns into integer kernels: the facts the placement rules are built on.

onnxruntime CPU (its QDQ selectors, onnxruntime/core/optimizer/qdq_transformer/selectors_actions):
- DQ -> Conv -> Q with per-channel axis-0 int8 weights becomes QLinearConv (u8 or s8 activations).
- DQ -> Gemm -> (Q) becomes QGemm, with or without the output Q.
- DQ -> MatMul with a per-column (axis 1) int8 weight becomes QLinearMatMul, MatMulIntegerToFloat without Q;
  so does a MatMul of two quantized activations.
- DQ -> {Add, Mul} -> Q become QLinearAdd / QLinearMul.
- MaxPool, Reshape, Transpose between DQ and Q with equal scale and zero point run on uint8 (the
  pair is dropped); with different params they stay float between DQ and Q.
- Relu before Q is removed when the zero point is the type minimum (with 128 the conv stays float);
  Clip(0, 6) likewise, only when the Q range lies inside [0, 6].
- A DQ shared by two consumers is as good as one DQ each (both convs become QLinearConv).
- ConvTranspose stays float whatever its weight layout; HardSwish and HardSigmoid stay float, so the
  ort-cpu target rewrites them as a depthwise 1x1 conv and a clip first (passes/hard_gates.py).
- DQ(int4, axis 0, block_size) -> MatMul/Gemm on a float input becomes com.microsoft MatMulNBits
  (conditions in emit/int4_matmul.py); an int4 Conv weight is dequantized on every run instead.
Each line above: checked on onnxruntime 1.32 by tests/emit/test_ort_cpu_rules.py.
Concat, AveragePool, GlobalAveragePool, Sigmoid, LeakyRelu and Resize are from the selector
source, not checked by a test here (QLinearConcat and QLinearGlobalAveragePool do appear in the
optimized mobile net of that test).
u8 activations with s8 weights: 3.5x faster than fp32 for a 3x3 conv on this CPU; s8 x s8 0.8x.

TensorRT (developer guide, Q/DQ layer placement): int8 symmetric activations, per-output-channel
weights, Q/DQ on weighted-layer inputs and on a residual Add's identity input, float biases.
Layout checked on onnxruntime 1.32 CPU (runs, SQNR floor) by tests/emit/test_tensorrt_target.py;
not checked against TensorRT itself (no GPU here).
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
    # Quantize an anchor's output: QLinearConv needs the Q after the conv; TensorRT does not.
    quantize_anchor_outputs: bool = True
    # Anchors whose integer kernel also writes float (QGemm, MatMulIntegerToFloat): their output is
    # quantized only where an integer op reads it. A network's last MatMul feeding its Softmax
    # otherwise rounds the logits to the activation grid: on PP-OCRv4 rec at W6A6 that cost 8 points
    # of exact match (BENCHMARKS.md, session 16), at no gain in speed.
    float_output_anchors: frozenset[str] = frozenset()
    # Quantize the identity input of an Add fed by a quantized conv (TensorRT's residual fusion).
    quantize_residual_inputs: bool = False
    # Store biases as int32 behind a DequantizeLinear (QLinearConv/QGemm); TensorRT wants float.
    int32_bias: bool = True
    # How an activation grid narrower than its 8-bit container (6-bit: 64 levels in uint8) is held:
    # "integer" puts Clip on the quantized tensor (Q -> Clip(0, 63) -> DQ), which onnxruntime runs
    # on uint8 and which keeps every QDQ fusion; "float" clips before the Q, for TensorRT, where no
    # integer Clip fuses. Either computes exactly what true narrow arithmetic would.
    narrow_activation_clip: str = "integer"
    # u8 x s8 products are summed in int16 pairs on x86 without VNNI (see emit/saturation.py).
    u8s8_pair_saturation: bool = True
    # Anchors whose weight at <= 4 bits is stored as true int4 behind a block-wise DequantizeLinear,
    # input left float, for the runtime's weight-only kernel (emit/int4_matmul.py). Empty: every
    # width stays in an int8 container.
    weight_only_int4: frozenset[str] = frozenset()
    # Give an all-equal float operand of a quantized Add/Mul an exact uint8 DequantizeLinear
    # (emit/constant_operands.py): onnxruntime fuses QLinearAdd/QLinearMul only with DQ on every input.
    quantize_constant_operands: bool = False
    # Rewrite HardSigmoid/HardSwish as a depthwise 1x1 conv and Clip(0, 1) before calibration
    # (passes/hard_gates.py): the runtime has an int8 conv but no int8 hard gate.
    hard_gates_as_conv: bool = False


ORT_CPU = TargetRules(
    name="ort-cpu",
    anchors=frozenset({"Conv", "Gemm", "MatMul"}),
    int8_ops=frozenset({"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}),
    passthrough_ops=frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Resize"}),
    absorbed_activations=frozenset({"Relu", "Clip"}),
    signed_activations=False,
    symmetric_activations=False,
    float_output_anchors=frozenset({"Gemm", "MatMul"}),
    weight_only_int4=frozenset({"MatMul", "Gemm"}),   # MatMulNBits; no int4 Conv kernel
    quantize_constant_operands=True,
    hard_gates_as_conv=True,
)

TENSORRT = TargetRules(
    name="tensorrt",
    anchors=frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"}),
    int8_ops=frozenset({"Add", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool"}),
    passthrough_ops=frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}),
    absorbed_activations=frozenset({"Relu", "Clip"}),
    signed_activations=True,
    symmetric_activations=True,
    quantize_anchor_outputs=False,
    quantize_residual_inputs=True,
    int32_bias=False,
    narrow_activation_clip="float",
    u8s8_pair_saturation=False,
)

TARGETS = {rules.name: rules for rules in (ORT_CPU, TENSORRT)}
