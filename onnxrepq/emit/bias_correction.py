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
dependency order, each level measured after the levels before it were corrected; layers of
parallel branches share a level.

Cost: the quantized graph is cut at each level's layer outputs, and each piece runs once over the
data on the tensors the pieces before it left. A bias moves its layer's output by exactly the
added value, so the stored output is shifted in place of running everything upstream again: the
data crosses the quantized graph once in all, not once per level (PP-OCRv4 rec, 47 levels: the
per-level full passes took 357 s, BENCHMARKS.md). Per-sample means give each shift's standard
error, reported in the notes.

Where the shift is measured (``measure``): at the layer output, before its Relu/Clip and before
any QuantizeLinear ("layer"), or, for a layer whose only consumer is a Relu/Clip, the bias that
makes the mean *after* the activation match the float one ("activation"): noise around zero
raises the mean of a Relu's output even when the pre-activation mean is right.

Guard (``guard``): matched means are not always closer outputs. On ddddocr's recognizer the
corrected convolutions feed an LSTM whose output moved further from float although every
corrected mean was right and its input as close as before. So the corrected graph is run once
more as deployed and kept only if its outputs are no further from the float model's than the
uncorrected graph's; otherwise the pass hands back the graph as it came.
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
                 config: BiasCorrectionConfig = BiasCorrectionConfig(), seed: int = 0, progress: bool = False,
                 reconstructed: bool = False):
        self.float_model = float_model
        self.measure = config.measure_after(reconstructed)
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
        use_activation = self.measure == "activation"
        targets = _float_means(self.float_model, layers, feeds, use_activation)
        bands = _bands(graph, layers, self.config.max_bands)
        # Merged levels hold layers that feed each other: a shifted stored output would miss the
        # correction of the layers before it in its band, so such a piece is run again instead.
        merged = len(bands) < len(_bands(graph, layers, 0))
        uncorrected = gs.export_onnx(graph)
        pieces = _Pieces(uncorrected, bands, feeds)
        generator = np.random.default_rng(self.seed)
        errors: dict[str, float] = {}
        with Progress("correcting biases", total=len(bands) * len(feeds), enabled=self.progress) as bar:
            for index, chosen in enumerate(bands):
                stats = _quantized_stats(pieces, index, chosen, use_activation, self.config.values_per_channel,
                                         generator, bar.update)
                for layer in chosen:
                    sums, values = stats[layer.output.name]
                    means = targets[layer.output.name]
                    shift = means.layer_mean - sums.sum(axis=0) / means.count
                    errors[layer.node.name] = _relative_error(means.feed_sums - sums, means.feed_counts, shift)
                    if values is not None and layer.activation is not None:
                        shift = _activation_shift(values, means.activation_mean, layer.activation, shift)
                    if not _add_to_bias(layer, shift):
                        refused.append(f"{layer.node.name}: bias does not hold one value per channel")
                    elif not merged:
                        pieces.shift(layer, shift)
                if merged:
                    pieces.rerun(index, gs.export_onnx(graph))
        layers = [layer for layer in layers if layer.correction is not None]
        graph.cleanup().toposort()
        size = float(np.mean([np.abs(layer.correction).mean() for layer in layers])) if layers else 0.0
        where = "layer outputs" if self.measure == "layer" else "activations"
        samples = sum(len(next(iter(feed.values()))) for feed in feeds)
        notes = [f"{len(layers)} biases corrected in {len(bands)} bands over {samples} samples, means matched"
                 f" at the {where} (mean |correction| {size:.3g})"] + _error_notes(errors) + refused
        if layers and self.config.guard:
            kept, verdict = _keeps_correction(self.float_model, uncorrected, gs.export_onnx(graph), feeds, samples)
            notes.append(verdict)
            if not kept:
                return PassResult(gs.import_onnx(uncorrected), False, notes)
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


def _keeps_correction(float_model: onnx.ModelProto, uncorrected: onnx.ModelProto, corrected: onnx.ModelProto,
                      feeds: list[dict[str, np.ndarray]], samples: int) -> tuple[bool, str]:
    """Whether the corrected graph's float outputs are at least as close to the float model's as the
    uncorrected graph's on the calibration samples, and the note that says so.

    Any loss undoes it, however small: the samples are the ones the shifts were fitted on, which
    flatters the correction (ddddocr's recognizer: -0.4 dB on them, -2.1 dB held out, within two
    standard errors of the change per batch, so a significance test would have kept it). The
    price is a coin flip where the correction barely matters (the zoo's acnet: -0.07 dB on them,
    +0.45 dB on 5000 held-out images). Run as deployed (every fusion on, no intermediate output
    asked for): on a quantized network a change of kernel alone moves later tensors by as much as
    the shifts being corrected (ddddocr, BENCHMARKS.md session 17), so only the graph as it will
    run can judge.
    """
    names = [value.name for value in float_model.graph.output]
    if {value.name for value in corrected.graph.output} != set(names):
        return True, "bias correction kept unchecked: the outputs are not named as the float model's"
    sessions = [session_for(model, optimize=True) for model in (float_model, uncorrected, corrected)]
    powers, errors = [], []     # per feed (batch): float output power; squared error without and with
    for feed in feeds:
        reference, *quantized = [dict(zip(names, session.run(names, feed))) for session in sessions]
        floats = [name for name in names if np.issubdtype(reference[name].dtype, np.floating)]
        targets = {name: reference[name].astype(np.float64) for name in floats}
        powers.append(sum(float(np.sum(targets[name] ** 2)) for name in floats))
        errors.append([sum(float(np.sum((targets[name] - values[name]) ** 2)) for name in floats)
                       for values in quantized])
    power, (before, after) = float(np.sum(powers)), np.sum(errors, axis=0)
    if power == 0.0:
        return True, "bias correction kept unchecked: no float output with any power"
    relative = np.diff(np.asarray(errors), axis=1)[:, 0] / np.maximum(powers, 1e-30)   # > 0: worse with it
    noise = relative.std(ddof=1) / np.sqrt(len(relative)) if len(relative) > 1 else 0.0
    kept = after <= before
    sqnr = [10 * np.log10(power / max(error, 1e-30)) for error in (before, after)]
    return kept, (f"bias correction {'kept' if kept else 'undone'}: output SQNR {sqnr[0]:.2f} dB without it,"
                  f" {sqnr[1]:.2f} dB with it, on the {samples} samples it was measured on"
                  f" (change per batch {relative.mean():+.3g} +- {noise:.2g} of its output power)")


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
    values = [constant_value(activation.inputs[i]) if len(activation.inputs) > i and activation.inputs[i].name else None
              for i in (1, 2)]
    low = float(values[0]) if values[0] is not None else -np.inf
    high = float(values[1]) if values[1] is not None else np.inf
    return low, high


def _channel_rows(value: np.ndarray, axis: int) -> np.ndarray:
    """``value`` as [channels, everything else], in its own precision (sums accumulate in float64)."""
    return np.moveaxis(np.asarray(value), axis, 0).reshape(value.shape[axis], -1)


@dataclass
class _FloatMeans:
    """One layer's float output: per-feed channel sums (for the standard error) and the overall means."""

    feed_sums: np.ndarray          # [feeds, channels]
    feed_counts: np.ndarray        # [feeds] values per channel in each feed
    activation_sums: np.ndarray    # [channels] after the Relu/Clip, zeros where not measured

    @property
    def count(self) -> int:
        return int(self.feed_counts.sum())

    @property
    def layer_mean(self) -> np.ndarray:
        return self.feed_sums.sum(axis=0) / self.count

    @property
    def activation_mean(self) -> np.ndarray:
        return self.activation_sums / self.count


def _float_means(model: onnx.ModelProto, layers: list[_Layer], feeds, use_activation: bool
                 ) -> dict[str, _FloatMeans]:
    """Per layer, the float output's channel sums before and (where measured) after the activation."""
    names = [layer.output.name for layer in layers]
    sums: dict[str, list] = {name: [] for name in names}
    counts: dict[str, list] = {name: [] for name in names}
    activated: dict[str, np.ndarray] = dict.fromkeys(names, 0.0)
    session = session_for(model, names)
    for values in run_tensors(session, feeds, names):
        for layer in layers:
            rows = _channel_rows(values[layer.output.name], layer.channel_axis)
            sums[layer.output.name].append(rows.sum(axis=1, dtype=np.float64))
            counts[layer.output.name].append(rows.shape[1])
            if use_activation and layer.activation is not None:
                activated[layer.output.name] = activated[layer.output.name] + \
                    np.clip(rows, *_bounds(layer.activation)).sum(axis=1, dtype=np.float64)
    return {name: _FloatMeans(np.stack(sums[name]), np.asarray(counts[name], np.float64),
                              np.broadcast_to(activated[name], sums[name][0].shape))
            for name in names}


def _quantized_stats(pieces: "_Pieces", index: int, layers: list[_Layer], use_activation: bool, keep: int,
                     generator: np.random.Generator, update) -> dict[str, tuple[np.ndarray, Optional[np.ndarray]]]:
    """Per layer, the simulation graph's per-feed channel sums and, where needed, a sample of its values."""
    names = [layer.output.name for layer in layers]
    sums: dict[str, list] = {name: [] for name in names}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    per_feed = max(1, keep // max(len(pieces.feeds), 1))
    for values in pieces.run(index, names):
        for layer in layers:
            rows = _channel_rows(values[layer.output.name], layer.channel_axis)
            sums[layer.output.name].append(rows.sum(axis=1, dtype=np.float64))
            if use_activation and layer.activation is not None:
                picked = generator.choice(rows.shape[1], min(per_feed, rows.shape[1]), replace=False)
                # float32: 32768 values a channel, half the memory of float64 (sums stay float64)
                samples[layer.output.name].append(rows[:, picked].astype(np.float32))
        update()
    return {name: (np.stack(sums[name]), np.concatenate(samples[name], axis=1) if samples[name] else None)
            for name in names}


def _relative_error(differences: np.ndarray, counts: np.ndarray, shift: np.ndarray) -> float:
    """The standard error of the mean shift over the feeds, as a fraction of the mean |shift|.

    ``differences``: per feed and channel, the sum of (float - quantized); small means the shift
    has converged and fewer samples would do.
    """
    if len(counts) < 2:
        return float("nan")
    per_feed = differences / counts[:, None]
    error = per_feed.std(axis=0, ddof=1) / np.sqrt(len(counts))
    return float(error.mean() / max(float(np.abs(shift).mean()), 1e-30))


def _error_notes(errors: dict[str, float]) -> list[str]:
    finite = {name: value for name, value in errors.items() if np.isfinite(value)}
    if not finite:
        return []
    worst = max(finite, key=finite.get)
    return [f"standard error of the measured shifts: median {np.median(list(finite.values())):.1%} of the mean"
            f" |shift| (largest {finite[worst]:.1%}, {worst})"]


class _Pieces:
    """The simulation graph cut at each band's layer outputs, run one piece at a time.

    Piece k holds the nodes that band k's layer outputs depend on and no earlier piece ran; it
    reads the graph inputs and the tensors earlier pieces stored (each kept until its last reader
    has run). Nodes no band depends on (the head after the last layer) never run.
    """

    def __init__(self, model: onnx.ModelProto, bands: list[list[_Layer]], feeds: list[dict[str, np.ndarray]]):
        self.model, self.feeds = model, feeds
        nodes = model.graph.node
        producers = {name: i for i, node in enumerate(nodes) for name in node.output if name}
        reads = [_node_inputs(node) for node in nodes]
        owner: dict[int, int] = {}
        self.pieces: list[list[int]] = []
        for index, band in enumerate(bands):
            stack, piece = [producers[layer.output.name] for layer in band], []
            while stack:
                node = stack.pop()
                if node in owner:
                    continue
                owner[node] = index
                piece.append(node)
                stack += [producers[name] for name in reads[node] if name in producers]
            self.pieces.append(sorted(piece))
        self.last_use: dict[str, int] = {}   # a tensor one piece makes and a later one reads -> its last reader
        for index, piece in enumerate(self.pieces):
            for name in (name for node in piece for name in reads[node]):
                if name in producers and owner.get(producers[name], index) != index:
                    self.last_use[name] = index
        self.stored: dict[str, list[np.ndarray]] = {}

    def run(self, index: int, names: list[str]) -> Iterable[dict[str, np.ndarray]]:
        """Yield, feed by feed, piece ``index``'s values of ``names``, storing what later pieces read."""
        for name in [n for n, last in self.last_use.items() if last < index and n in self.stored]:
            del self.stored[name]
        made = {output for node in self.pieces[index] for output in self.model.graph.node[node].output}
        kept = [name for name in made if self.last_use.get(name, -1) > index]
        outputs = list(dict.fromkeys(names + kept))
        if not outputs:
            return
        initializers = {tensor.name: tensor for tensor in self.model.graph.initializer}
        # read from the current model: a corrected bias may be a new constant
        reads = list(dict.fromkeys(name for node in self.pieces[index]
                                   for name in _node_inputs(self.model.graph.node[node])))
        inputs = [name for name in reads if name not in made and name not in initializers]
        session = session_for(self._piece_model(index, inputs, [initializers[n] for n in reads if n in initializers]),
                              outputs)
        for feed_index, feed in enumerate(self.feeds):
            given = {name: self.stored[name][feed_index] if name in self.stored else feed[name] for name in inputs}
            values = dict(zip(outputs, session.run(outputs, given)))
            for name in kept:
                self.stored.setdefault(name, [None] * len(self.feeds))[feed_index] = values[name]
            yield values

    def _piece_model(self, index: int, inputs: list[str], initializers: list) -> onnx.ModelProto:
        declared = {value.name: value for value in self.model.graph.input}
        values = [declared[name] if name in declared else onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(self.stored[name][0].dtype), None) for name in inputs]
        graph = onnx.helper.make_graph([self.model.graph.node[node] for node in self.pieces[index]],
                                       f"piece_{index}", values, [], initializers)
        piece = onnx.helper.make_model(graph, opset_imports=self.model.opset_import,
                                       ir_version=self.model.ir_version)
        piece.functions.extend(self.model.functions)
        return piece

    def shift(self, layer: _Layer, shift: np.ndarray) -> None:
        """Move a stored layer output as its corrected bias moves it."""
        for value in self.stored.get(layer.output.name, []):
            shape = [1] * value.ndim
            shape[layer.channel_axis] = -1
            value += shift.astype(value.dtype).reshape(shape)   # onnxruntime hands out arrays it no longer holds

    def rerun(self, index: int, model: onnx.ModelProto) -> None:
        """Run piece ``index`` again on ``model`` (the graph with this band's biases corrected)."""
        self.model = model
        for _ in self.run(index, []):
            pass


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, including those its subgraphs (If, Loop) take from the outer graph."""
    names = list(node.input)
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            defined = {value.name for value in subgraph.input} | {t.name for t in subgraph.initializer} | \
                {output for inner in subgraph.node for output in inner.output}
            names += [name for inner in subgraph.node for name in _node_inputs(inner) if name not in defined]
    return [name for name in dict.fromkeys(names) if name]


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
    clipped_mean = _ClippedMean(values, low, high)
    for _ in range(48):
        middle = (lower + upper) / 2
        reached = clipped_mean(middle) >= target
        upper, lower = np.where(reached, middle, upper), np.where(reached, lower, middle)
    return np.where(inside, upper, layer_shift)


class _ClippedMean:
    """mean(clip(values + d, low, high)) per channel row, for a shift d per row, from the sorted rows
    and their running sums: each evaluation is a binary search per row instead of a pass over every
    value, so the bisection above costs next to nothing whatever the number of values."""

    def __init__(self, values: np.ndarray, low: float, high: float):
        self.sorted = np.sort(values, axis=1)
        self.sums = np.concatenate([np.zeros((len(values), 1)), np.cumsum(self.sorted, axis=1, dtype=np.float64)],
                                   axis=1)
        self.low, self.high = low, high

    def _count_below(self, bound: np.ndarray) -> np.ndarray:
        """Per row, how many sorted values lie below ``bound`` (a vectorised binary search)."""
        lo, hi = np.zeros(len(bound), np.int64), np.full(len(bound), self.sorted.shape[1], np.int64)
        rows = np.arange(len(bound))
        while np.any(active := lo < hi):
            middle = np.minimum((lo + hi) // 2, self.sorted.shape[1] - 1)
            below = self.sorted[rows, middle] < bound
            lo, hi = np.where(active & below, middle + 1, lo), np.where(active & ~below, middle, hi)
        return lo

    def __call__(self, shift: np.ndarray) -> np.ndarray:
        count = self.sorted.shape[1]
        rows = np.arange(len(shift))
        first = self._count_below(self.low - shift) if np.isfinite(self.low) else np.zeros(len(shift), np.int64)
        last = self._count_below(self.high - shift) if np.isfinite(self.high) else np.full(len(shift), count)
        last = np.maximum(last, first)
        middle = self.sums[rows, last] - self.sums[rows, first] + shift * (last - first)
        total = middle + (self.low * first if np.isfinite(self.low) else 0.0) \
            + (self.high * (count - last) if np.isfinite(self.high) else 0.0)
        return total / count


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
