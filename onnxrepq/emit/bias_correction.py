"""CorrectBias: empirical bias correction of the simulation graph (issue #10).

Rounding a channel's weights leaves an error that does not cancel over the inputs when they have
a non-zero mean (after a Relu every input is >= 0), so the layer's output moves by an expected
shift per output channel. No scale search removes it; the bias can. As in DFQ's empirical bias
correction (Nagel et al., arXiv 1906.04721, sec. 4.2), AIMET's and NNCF's: run the calibration
data through the float model and through the quantized one under onnxruntime, take each output
channel's mean of (float - quantized) at the layer's output, and add it to the layer's bias.

Which layers:
1. Conv, ConvTranspose and Gemm whose weight comes through a DequantizeLinear (a quantized
   weight). One without a bias gets one; QuantizeBias then stores it as int32 like any other.
2. MatMul with a quantized weight whose output (directly, or through its Q/DQ pair) feeds an Add
   of a constant per-column vector: that vector is its bias, measured at the Add's output.
   A MatMul without one is left alone: a new Add between it and its Q would keep it out of
   onnxruntime's QLinearMatMul.
3. A layer whose output has no tensor of the same name in the float model is left alone.

Order: the quantized output includes the shifts of every layer before it, so a layer corrected
together with its predecessors also corrects their shift, which their own correction removes
again: counted twice (on the zoo at 4-bit weights, correcting all layers at once lost 2-5 dB
where one level at a time gained up to 3.4). Layers are therefore corrected level by level of the
dependency order, each level measured after the levels before it were corrected: one
onnxruntime pass over the data per level; layers of parallel branches share a level.

Where the shift is measured (``measure``): at the layer output, before its Relu/Clip and before
any QuantizeLinear ("layer"), or, for a layer whose only consumer is a Relu/Clip, the bias that
makes the mean *after* the activation match the float one ("activation"): noise around zero
raises the mean of a Relu's output even when the pre-activation mean is right.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibrate.runner import run_tensors, session_for
from ..config import BiasCorrectionConfig
from ..graph.patterns import constant_value, producer
from ..passes.base import PassResult
from ..progress import Progress

Feed = Mapping[str, np.ndarray]


@dataclass
class _Layer:
    """A weighted node, the tensor where its shift is measured, and where its bias lives."""

    node: gs.Node
    output: gs.Tensor
    bias_node: gs.Node         # the node whose input ``bias_index`` holds (or will hold) the bias
    bias_index: int
    channel_axis: int          # of ``output``
    bias_gain: float = 1.0     # the layer output moves by gain x bias (Gemm's beta)
    activation: Optional[gs.Node] = None   # a Relu/Clip that is the output's only consumer
    correction: Optional[np.ndarray] = field(default=None, repr=False)


class CorrectBias:
    """Add each quantized layer's mean output shift (float - quantized, per channel) to its bias."""

    name = "correct_bias"

    def __init__(self, float_model: onnx.ModelProto, calibration: Iterable[Feed],
                 config: BiasCorrectionConfig = BiasCorrectionConfig(), seed: int = 0, progress: bool = False):
        self.float_model = float_model
        self.calibration = calibration
        self.config = config
        self.seed = seed
        self.progress = progress

    def __call__(self, graph: gs.Graph) -> PassResult:
        graph.toposort()
        layers, refused = _collect_layers(graph, {o for node in self.float_model.graph.node for o in node.output})
        if not layers:
            return PassResult(graph, False, ["no layer to correct"] + refused)
        feeds = self._feeds()
        use_activation = self.config.measure == "activation"
        targets = _float_means(self.float_model, layers, feeds, use_activation)
        bands = _bands(graph, layers, self.config.max_bands)
        generator = np.random.default_rng(self.seed)
        with Progress("correcting biases", total=len(bands) * len(feeds), enabled=self.progress) as bar:
            for chosen in bands:
                stats = _quantized_stats(graph, chosen, feeds, use_activation, self.config.values_per_channel,
                                         generator, bar.update)
                for layer in chosen:
                    mean, values = stats[layer.output.name]
                    layer_mean, activation_mean = targets[layer.output.name]
                    shift = layer_mean - mean
                    if values is not None and layer.activation is not None:
                        shift = _activation_shift(values, activation_mean, layer.activation, shift)
                    if not _add_to_bias(layer, shift):
                        refused.append(f"{layer.node.name}: bias does not hold one value per channel")
        layers = [layer for layer in layers if layer.correction is not None]
        graph.cleanup().toposort()
        size = float(np.mean([np.abs(layer.correction).mean() for layer in layers])) if layers else 0.0
        notes = [f"{len(layers)} biases corrected in {len(bands)} bands over {len(feeds)} samples"
                 f" (mean |correction| {size:.3g})"] + refused
        return PassResult(graph, bool(layers), notes)

    def _feeds(self) -> list[dict[str, np.ndarray]]:
        """Up to ``max_samples`` samples, in memory: every band reads them once more."""
        feeds, seen = [], 0
        for feed in self.calibration:
            count = len(next(iter(feed.values())))
            keep = min(count, self.config.max_samples - seen)
            feeds.append({name: np.asarray(value)[:keep] for name, value in feed.items()})
            seen += keep
            if seen >= self.config.max_samples:
                break
        return feeds


def _bands(graph: gs.Graph, layers: list[_Layer], max_bands: int) -> list[list[_Layer]]:
    """Layers by dependency level: a layer's level is one more than the highest level among the
    layers upstream of it, so layers of one level never feed each other (parallel branches)."""
    anchors = {id(layer.node): layer for layer in layers}
    depth: dict[int, int] = {}   # id(tensor) -> highest level upstream of it
    levels: dict[int, list[_Layer]] = {}
    for node in graph.nodes:     # topologically sorted
        level = max((depth.get(id(t), 0) for t in node.inputs), default=0)
        if id(node) in anchors:
            level += 1
            levels.setdefault(level, []).append(anchors[id(node)])
        for tensor in node.outputs:
            depth[id(tensor)] = level
    ordered = [levels[key] for key in sorted(levels)]
    if max_bands <= 0 or len(ordered) <= max_bands:
        return ordered
    parts = np.array_split(np.arange(len(ordered)), max_bands)
    return [[layer for index in part for layer in ordered[index]] for part in parts]


def _collect_layers(graph: gs.Graph, float_names: set[str]) -> tuple[list[_Layer], list[str]]:
    layers, refused = [], []
    for node in graph.nodes:
        layer, reason = _find_layer(node)
        if layer is not None and layer.output.name not in float_names:
            layer, reason = None, "output has no float counterpart"
        if layer is not None:
            layers.append(layer)
        elif reason:
            refused.append(f"{node.name}: {reason}")
    return layers, refused


def _find_layer(node: gs.Node) -> tuple[Optional[_Layer], str]:
    """The layer ``node`` anchors, or None with why (empty: not a quantized weighted node at all)."""
    if node.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None, ""
    weight = producer(node.inputs[1])
    if weight is None or weight.op != "DequantizeLinear":
        return None, ""
    if node.op == "MatMul":
        return _matmul_layer(node)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and constant_value(bias) is None:
        return None, "bias is not a constant"
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if beta == 0.0:
            return None, "Gemm with beta 0 ignores its bias"
        return _Layer(node, node.outputs[0], node, 2, -1, beta, _activation(node.outputs[0])), ""
    return _Layer(node, node.outputs[0], node, 2, 1, 1.0, _activation(node.outputs[0])), ""


def _matmul_layer(node: gs.Node) -> tuple[Optional[_Layer], str]:
    tensor = node.outputs[0]
    if len(tensor.outputs) == 1 and tensor.outputs[0].op == "QuantizeLinear":
        dequantizers = tensor.outputs[0].outputs[0].outputs
        if len(dequantizers) == 1 and dequantizers[0].op == "DequantizeLinear":
            tensor = dequantizers[0].outputs[0]
    add = tensor.outputs[0] if len(tensor.outputs) == 1 else None
    if add is None or add.op != "Add":
        return None, "MatMul without a bias Add"
    index = next((i for i, t in enumerate(add.inputs) if t is not tensor), None)
    value = constant_value(add.inputs[index]) if index is not None else None
    if value is None or value.size < 1 or (value.ndim > 1 and max(value.shape[:-1], default=1) > 1):
        return None, "MatMul's Add is not a per-column constant"
    return _Layer(node, add.outputs[0], add, index, -1, 1.0, _activation(add.outputs[0])), ""


def _activation(tensor: gs.Tensor) -> Optional[gs.Node]:
    consumers = tensor.outputs
    if len(consumers) == 1 and consumers[0].op in ("Relu", "Clip") and consumers[0].inputs[0] is tensor:
        bounds = [constant_value(t) for t in consumers[0].inputs[1:3] if t.name]
        if all(b is not None for b in bounds):
            return consumers[0]
    return None


def _bounds(activation: gs.Node) -> tuple[float, float]:
    if activation.op == "Relu":
        return 0.0, np.inf
    values = [constant_value(t) if len(activation.inputs) > i and activation.inputs[i].name else None
              for i in (1, 2)]
    low = float(values[0]) if values[0] is not None else -np.inf
    high = float(values[1]) if values[1] is not None else np.inf
    return low, high


def _channel_rows(value: np.ndarray, axis: int) -> np.ndarray:
    """``value`` as [channels, everything else]."""
    return np.moveaxis(np.asarray(value, np.float64), axis, 0).reshape(value.shape[axis], -1)


def _float_means(model: onnx.ModelProto, layers: list[_Layer], feeds, use_activation: bool
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the float output's channel means before and (where measured) after the activation."""
    names = [layer.output.name for layer in layers]
    sums: dict[str, list] = {name: [0.0, 0.0] for name in names}
    counts = dict.fromkeys(names, 0)
    session = session_for(model, names)
    for values in run_tensors(session, feeds, names):
        for layer in layers:
            rows = _channel_rows(values[layer.output.name], layer.channel_axis)
            sums[layer.output.name][0] += rows.sum(axis=1)
            if use_activation and layer.activation is not None:
                sums[layer.output.name][1] += np.clip(rows, *_bounds(layer.activation)).sum(axis=1)
            counts[layer.output.name] += rows.shape[1]
    return {name: (sums[name][0] / counts[name], sums[name][1] / counts[name]) for name in names}


def _quantized_stats(graph: gs.Graph, layers: list[_Layer], feeds, use_activation: bool, keep: int,
                     generator: np.random.Generator, update) -> dict[str, tuple[np.ndarray, Optional[np.ndarray]]]:
    """Per layer, the simulation graph's channel means and, where needed, a sample of its values."""
    names = [layer.output.name for layer in layers]
    session = session_for(gs.export_onnx(graph), names)
    sums: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)
    per_feed = max(1, keep // max(len(feeds), 1))
    for values in run_tensors(session, feeds, names):
        for layer in layers:
            rows = _channel_rows(values[layer.output.name], layer.channel_axis)
            sums[layer.output.name] = sums.get(layer.output.name, 0.0) + rows.sum(axis=1)
            counts[layer.output.name] += rows.shape[1]
            if use_activation and layer.activation is not None:
                picked = generator.choice(rows.shape[1], min(per_feed, rows.shape[1]), replace=False)
                samples[layer.output.name].append(rows[:, picked])
        update()
    return {name: (sums[name] / counts[name], np.concatenate(samples[name], axis=1) if samples[name] else None)
            for name in names}


def _activation_shift(values: np.ndarray, target: np.ndarray, activation: gs.Node,
                      layer_shift: np.ndarray) -> np.ndarray:
    """Per channel, the shift d with mean(act(values + d)) = target, by bisection (the mean rises with d).

    A channel whose float output the activation cuts off entirely (target at a bound) has no unique
    d; it keeps the shift measured at the layer output.
    """
    low, high = _bounds(activation)
    tolerance = 1e-6 * (np.abs(values).max(axis=1) + 1e-12)
    inside = (target > low + tolerance) & (target < high - tolerance)
    spread = values.max(axis=1) - values.min(axis=1) + np.abs(target) + 1e-6
    lower, upper = -spread - np.abs(values).max(axis=1), spread + np.abs(values).max(axis=1)
    for _ in range(48):
        middle = (lower + upper) / 2
        reached = np.clip(values + middle[:, None], low, high).mean(axis=1) >= target
        upper, lower = np.where(reached, middle, upper), np.where(reached, lower, middle)
    return np.where(inside, upper, layer_shift)


def _add_to_bias(layer: _Layer, shift: np.ndarray) -> bool:
    delta = (shift / layer.bias_gain).astype(np.float64)
    node, index = layer.bias_node, layer.bias_index
    current = node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None
    if current is None:
        new = delta.astype(np.float32)
    else:
        value = np.asarray(constant_value(current), np.float64)
        if value.size == delta.size:
            new = (value + delta.reshape(value.shape)).astype(np.float32)
        elif value.size == 1:  # one bias broadcast over the channels
            new = (value.reshape(-1) + delta).astype(np.float32)
        else:
            return False
    layer.correction = shift.astype(np.float32)
    if current is not None and len(current.outputs) == 1 and np.asarray(current.values).shape == new.shape:
        current.values = new
        return True
    constant = gs.Constant(f"{layer.node.name}_corrected_bias", new)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = constant
    return True
