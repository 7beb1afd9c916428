"""Accuracy and fidelity measures the bench reports; plain numpy so they are easy to test."""
import numpy as np
import onnx

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def levenshtein(source: str, target: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1), one row at a time."""
    previous = list(range(len(target) + 1))
    for i, source_char in enumerate(source, start=1):
        current = [i]
        for j, target_char in enumerate(target, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (source_char != target_char)))
        previous = current
    return previous[-1]


def character_error_rate(predictions: list[str], labels: list[str]) -> float:
    """Total edits over total label characters (so long lines weigh more than short ones)."""
    edits = sum(levenshtein(p, l) for p, l in zip(predictions, labels))
    return edits / max(1, sum(len(l) for l in labels))


def exact_match(predictions: list[str], labels: list[str]) -> float:
    return float(np.mean([p == l for p, l in zip(predictions, labels)]))


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio over all elements; inf when identical (JSON writers beware)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = np.sum((reference - np.asarray(approximation, dtype=np.float64)) ** 2)
    if noise == 0:
        return float("inf")
    return float(10.0 * np.log10(np.sum(reference ** 2) / noise))


def mean_mask_iou(reference_maps: np.ndarray, other_maps: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the maps thresholded at `threshold`, per image (axis 0), averaged; two empty masks agree fully."""
    ious = []
    for reference, other in zip(reference_maps, other_maps):
        a, b = reference > threshold, other > threshold
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return float(np.mean(ious))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == np.asarray(labels)))


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers plus Constant-node values, by output name."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def int8_weight_fraction(model: onnx.ModelProto) -> float:
    """Share of Conv/MatMul/Gemm weight elements (input 1) that run as int8.

    Counted as int8: an int8/uint8 constant -> DequantizeLinear -> op, and also a float constant ->
    QuantizeLinear -> DequantizeLinear -> op, which onnxruntime's quantizer writes for opset < 13 models and
    which onnxruntime constant-folds into an int8 weight at session load. Float constants count in the
    denominator only.
    """
    graph = model.graph
    constants = constant_tensors(graph)
    quantized_constants = {node.output[0]: node.input[0] for node in graph.node
                           if node.op_type == "QuantizeLinear" and node.input[0] in constants}
    dequantized = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        if source in constants and constants[source].data_type in INT8_TYPES:
            dequantized[node.output[0]] = source
        elif source in quantized_constants:
            dequantized[node.output[0]] = quantized_constants[source]
    int8_elements = total_elements = 0
    for node in graph.node:
        weight = node.input[1] if node.op_type in WEIGHTED_OPS and len(node.input) > 1 else None
        if weight in dequantized:
            int8_elements += int(np.prod(constants[dequantized[weight]].dims))
        if weight in dequantized or weight in constants:
            total_elements += int(np.prod(constants[dequantized.get(weight, weight)].dims))
    return int8_elements / total_elements if total_elements else 0.0
