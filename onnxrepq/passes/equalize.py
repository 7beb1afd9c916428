"""Cross-layer equalization: balance per-channel weight ranges across conv pairs.

Merged re-parameterized convs leave some output channels with weights 100x larger than others;
one per-channel scale per output channel handles the first conv, but the next conv sees those
channels through a single per-tensor activation scale. Rescaling channel i of the first conv by
1/s_i and input channel i of the second by s_i changes nothing in float when the activation
between them is positively homogeneous (Relu(x/s) = Relu(x)/s for s > 0), and equalises both.

HardSwish is not homogeneous, but in the form passes/hard_gates.py gives it, x * clip(a_i x + b_i, 0, 1)
with (a_i, b_i) a depthwise 1x1 conv, the gate conv can take s_i back (a_i s_i (x / s_i) = a_i x): the
gate is unchanged and the product is divided by s_i. Scalar or per-channel Mul/Div by a constant commute
with the scale, and an added constant is divided with its channel (PP-LCNetV3's learnable affine after
each activation), so mobile nets of that family equalize across their activations too.

High-bias absorption (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1, in its data-aware
form since our BN is already folded): where channel i of the Relu's input is >= c_i > 0 on all
calibration data, Relu(x) = Relu(x - c_i) + c_i there, so c_i leaves the first conv's bias and
W2 @ c (summed over the kernel taps) joins the second conv's bias. The tensor between loses c_i
from its range. Only a second conv without spatial padding takes it: a padded one reads zeros at
the border where the absorbed constant would have to be -c_i, and no conv bias can say that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional

import numpy as np
import onnx_graphsurgeon as gs

from ..calibrate.channel_stats import collect_channel_stats
from ..graph.patterns import channel_vector, constant_value, is_graph_output, sole_consumer
from .base import PassResult

# Activations f with f(x / s) = f(x) / s for every s > 0.
_HOMOGENEOUS = ("Relu",)


@dataclass(frozen=True)
class EqualizeConfig:
    max_scale: float = 32.0   # cap on s_i and 1/s_i: beyond it activations inflate (a known CLE failure)
    rounds: int = 3           # chains conv->conv->conv need a few sweeps to settle
    # Data-aware split of a channel's range between the activation and the second conv's weight
    # column: s_i = r_act(i)^alpha / r_col(i)^(1 - alpha) (SmoothQuant's migration strength).
    alpha: float = 0.5
    # Data-aware only: channels whose wanted scale is within this factor of the median's stay put,
    # the others get their full scale. At 1 (move every channel) the zoo lost 1-6 dB; at 4 it is
    # untouched while x100 / x0.01 channels are still fixed (tests/passes/test_equalize.py).
    tolerance: float = 4.0
    # High-bias absorption on the calibration minima (needs ``activation_minima``). Off by default:
    # it is exact only where inputs stay above the calibration minima (held-out data moved a dw->pw
    # net's float output by 1e-3 relative), while plain CLE is exact on any input. On those nets it
    # added 11-16 dB; on the zoo nothing qualifies (no Relu channel stays above zero).
    absorb_high_bias: bool = False


class EqualizeCrossLayer:
    """Equalize every Conv -> path -> Conv pair, the path made of Relu, PRelu(slope >= 0), gated
    products x * f(depthwise_1x1(x)), and Mul/Div/Add/Sub by scalar or per-channel constants (or nothing).

    Rules: each tensor on the path has exactly one consumer (a gated one: the product and its gate
    conv); both convs have constant weights; the first conv's bias (if any) is scaled with it. Relu6
    and Clip are not homogeneous (their bound would have to move per channel), nor is a HardSwish
    op, so those pairs are left alone. Scales are capped at ``max_scale``; capped channels are
    counted in the notes.

    What is balanced depends on what is known. Weights are quantized per output channel, so the
    first conv's rows gain nothing from balancing; the tensor between the convs is quantized per
    tensor, so a channel with a range 100x the others' spends the 256 levels alone. Given
    ``activation_ranges`` (per-channel absmax of the tensor the second conv reads, from
    calibration) the pass balances that range against the second conv's weight column, whose
    row-wise grid pays for it; a depthwise second conv has one column per row and pays nothing,
    so there the activation channels are made equal outright. Pairs without ranges fall back to
    balancing the first conv's rows against the second conv's columns (weight-only CLE).

    Given ``activation_minima`` (per-channel minimum of the same tensors) the pairs with a Relu or
    PRelu between then absorb high biases (module docstring); the notes count the channels and the
    constant absorbed per pair, and the pairs refused for a padded second conv.
    """

    name = "equalize"

    def __init__(self, config: EqualizeConfig = EqualizeConfig(),
                 activation_ranges: Optional[Mapping[str, np.ndarray]] = None,
                 activation_minima: Optional[Mapping[str, np.ndarray]] = None):
        self.config = config
        self.activation_ranges = activation_ranges
        self.activation_minima = activation_minima

    def __call__(self, graph: gs.Graph) -> PassResult:
        pairs = equalization_pairs(graph)
        ranges = {name: np.asarray(value, np.float64) for name, value in (self.activation_ranges or {}).items()}
        cap = self.config.max_scale
        total: dict[str, np.ndarray] = {}  # the cap bounds the scale summed over rounds, not each round's
        for _ in range(self.config.rounds):
            for pair in pairs:
                first, second = pair.first, pair.second
                tensor = second.inputs[0].name
                if tensor in ranges:
                    activation = _fill_silent(ranges[tensor], _row_ranges(first))
                    wanted = _data_scale(activation, _column_shares(second), _depthwise(second), self.config)
                else:
                    wanted = _weight_scale(first, second)
                done = total.get(tensor, np.ones(len(wanted)))
                total[tensor] = np.clip(done * wanted, 1.0 / cap, cap)
                scale = total[tensor] / done
                _apply(pair, scale)
                if tensor in ranges:
                    ranges[tensor] = ranges[tensor] / scale
        aware = sum(pair.second.inputs[0].name in ranges for pair in pairs)
        notes = [f"{len(pairs)} conv pairs equalized ({aware} on activation ranges)"] if pairs else []
        capped = {tensor: int(np.sum((value >= cap) | (value <= 1.0 / cap))) for tensor, value in total.items()}
        if sum(capped.values()):
            notes.append(f"{sum(capped.values())} channel scales capped at {cap:g}: "
                         + ", ".join(f"{t} ({n})" for t, n in capped.items() if n)[:300])
        if self.config.absorb_high_bias and self.activation_minima:
            # the minima were measured before the rounds divided each channel by its total scale
            minima = {name: np.asarray(value, np.float64) / total.get(name, 1.0)
                      for name, value in self.activation_minima.items()}
            notes += absorb_high_biases(pairs, minima)
        return PassResult(graph, bool(pairs), notes)


def absorb_high_biases(pairs: list[Pair], minima: Mapping[str, np.ndarray]) -> list[str]:
    """Move each channel's calibration minimum c > 0 through the activation into the second conv's bias."""
    absorbed, padded = [], []
    for first, second, *_, absorbable in pairs:
        tensor = second.inputs[0]
        # no activation between: nothing is cut off, so nothing is "high"; gates and offsets: not a Relu
        if not absorbable or tensor.name not in minima:
            continue
        floor = np.maximum(minima[tensor.name], 0.0)
        if not floor.any():
            continue
        if _pads(second):
            padded.append(tensor.name)
            continue
        _absorb(first, second, floor)
        absorbed.append(f"{tensor.name} ({int(np.count_nonzero(floor))}/{len(floor)}, sum {floor.sum():.3g})")
    notes = []
    if absorbed:
        notes.append(f"high bias absorbed in {len(absorbed)} pairs: " + ", ".join(absorbed)[:600])
    if padded:
        notes.append(f"high bias left in {len(padded)} pairs whose second conv pads its input: "
                     + ", ".join(padded)[:300])
    return notes


def _pads(conv: gs.Node) -> bool:
    if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return True
    return any(int(p) != 0 for p in conv.attrs.get("pads", []))


def _absorb(first: gs.Node, second: gs.Node, floor: np.ndarray) -> None:
    """first's bias loses ``floor`` per channel; second's gains what its weights make of that constant."""
    w2 = _weights(second).astype(np.float64)
    groups = int(second.attrs.get("group", 1))
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
    taps = w2.reshape(groups, per_group_out, per_group_in, -1).sum(axis=3)            # (groups, out, in)
    gained = np.einsum("goi,gi->go", taps, floor.reshape(groups, per_group_in)).reshape(-1)
    _set(first, 2, (_bias(first) - floor).astype(np.float32))
    _set(second, 2, (_bias(second) + gained).astype(np.float32))


def _bias(conv: gs.Node) -> np.ndarray:
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].name:
        return constant_value(conv.inputs[2]).astype(np.float64)
    return np.zeros(_weights(conv).shape[0])


def channel_extremes(model, tensors: list[str], feeds) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel (axis 1) absmax and minimum of ``tensors`` over ``feeds``, in one onnxruntime pass."""
    stats = collect_channel_stats(model, tensors, feeds)
    return ({name: value.channel_absmax for name, value in stats.items() if value.channel_absmax is not None},
            {name: value.channel_min for name, value in stats.items() if value.channel_min is not None})


class Pair(NamedTuple):
    """Two convs and what lies between them that the channel scales pass through.

    ``gates`` are depthwise 1x1 convs that read the scaled tensor and gate it (HardSwish as
    ``x * clip(conv(x))`` after passes/hard_gates.py): their weights take the scale back, so the
    gate is unchanged and the product is scaled. ``offsets`` are Add/Sub nodes with a constant
    (a learnable affine after an activation, PP-LCNetV3's LAB): their constant is divided per
    channel (each held as (node, index of the constant)). ``absorbable``: the path is a single
    Relu/PRelu, where high-bias absorption holds.
    """
    first: gs.Node
    second: gs.Node
    gates: tuple = ()
    offsets: tuple = ()
    absorbable: bool = False


def equalization_pairs(graph: gs.Graph) -> list[Pair]:
    """The pairs the pass rewrites; ``pair.second.inputs[0]`` is the tensor the second conv reads."""
    return [pair for node in graph.nodes if node.op == "Conv" and (pair := _pair_after(graph, node))]


_MAX_PATH = 8


def _pair_after(graph: gs.Graph, first: gs.Node) -> Optional[Pair]:
    """Walk from the first conv through ops that commute with a per-channel scale to the next conv."""
    if len(first.outputs) != 1 or _weights(first) is None:
        return None
    channels, rank = _weights(first).shape[0], _weights(first).ndim
    tensor, gates, offsets, steps = first.outputs[0], [], [], []
    for _ in range(_MAX_PATH):
        if is_graph_output(tensor, graph):
            return None
        readers = list(tensor.outputs)
        if len(readers) == 2:
            product = _gated_product(graph, tensor, readers, channels)
            if product is None:
                return None
            gates.append(product[1])
            steps.append(product[0])
            tensor = product[0].outputs[0]
            continue
        if len(readers) != 1 or len(readers[0].outputs) != 1:
            return None
        node = readers[0]
        if node.op == "Conv":
            second = node
            break
        if _homogeneous(node):
            pass
        elif (node.op in ("Mul", "Div", "Add", "Sub")
              and (index := _constant_index(node, tensor, channels, rank)) is not None):
            if node.op in ("Add", "Sub"):
                offsets.append((node, index))
        else:
            return None
        steps.append(node)
        tensor = node.outputs[0]
    else:
        return None
    if second.inputs[0] is not tensor or _weights(second) is None:
        return None
    if _weights(second).shape[1] * int(second.attrs.get("group", 1)) != channels:
        return None
    absorbable = len(steps) == 1 and _homogeneous(steps[0])
    return Pair(first, second, tuple(gates), tuple(offsets), absorbable)


def _constant_index(node: gs.Node, tensor: gs.Tensor, channels: int, rank: int) -> Optional[int]:
    """Which input of ``node`` is its constant, when it is a scalar or varies along axis 1 only.

    c / x does not commute with a scale, so Div needs the activation first.
    """
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1] or tensor not in node.inputs:
        return None
    index = 1 - node.inputs.index(tensor)
    if node.op == "Div" and index == 0:
        return None
    value = constant_value(node.inputs[index])
    if value is None or value.dtype != np.float32:
        return None
    return index if channel_vector(value, channels, 1, rank) is not None else None


def _gated_product(graph: gs.Graph, tensor: gs.Tensor, readers: list, channels: int):
    """(the Mul, the gate conv) where ``tensor`` is read only by x * gate(x), the gate a depthwise conv.

    The depthwise conv's weights take the scale back at no cost to its per-channel grid, so
    everything after it in the gate, up to the product, is unchanged. (A squeeze-excite gate could
    take it back in its first dense conv's columns, but that spends the conv's row grids: on
    PP-OCRv4 rec its two pairs lost 0.2 dB at W6A6, BENCHMARKS.md session 13.)
    """
    products = [node for node in readers if node.op == "Mul" and len(node.inputs) == 2 and tensor in node.inputs
                and node.inputs[0] is not node.inputs[1] and len(node.outputs) == 1]
    if len(products) != 1:
        return None
    product = products[0]
    other = product.inputs[1 - product.inputs.index(tensor)]
    gate = next(reader for reader in readers if reader is not product)
    if gate.op != "Conv" or gate.inputs[0] is not tensor or len(gate.outputs) != 1 or _weights(gate) is None \
            or _weights(gate).shape[1] != 1 or int(gate.attrs.get("group", 1)) != channels:
        return None
    current = gate.outputs[0]
    for _ in range(_MAX_PATH):
        if current is other:
            return product, gate
        reader = sole_consumer(current, graph)
        if reader is None or reader.inputs[0] is not current or len(reader.outputs) != 1 \
                or any(constant_value(t) is None for t in reader.inputs[1:] if t.name):
            return None
        current = reader.outputs[0]
    return None


def _homogeneous(node: gs.Node) -> bool:
    if node.op in _HOMOGENEOUS:
        return True
    if node.op == "PRelu":
        slope = constant_value(node.inputs[1])
        return slope is not None and bool(np.all(slope >= 0)) and slope.size == 1
    return False


def _weights(node: gs.Node):
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name and \
            constant_value(node.inputs[2]) is None:
        return None
    return weight


def _depthwise(conv: gs.Node) -> bool:
    return _weights(conv).shape[1] == 1


def _column_ranges(second: gs.Node) -> np.ndarray:
    """max |w| of each input channel of the second conv, over the rows of its group."""
    w2 = np.abs(_weights(second).astype(np.float64))
    groups = int(second.attrs.get("group", 1))
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
    columns = w2.reshape(groups, per_group_out, per_group_in, -1).max(axis=(1, 3))  # (groups, per_group_in)
    return columns.reshape(-1)


def _column_shares(second: gs.Node) -> np.ndarray:
    """How much of each row's quantization range an input channel takes, averaged over the rows.

    Rows are quantized each on its own grid, so scaling a row costs nothing: the cost of a large
    column is that it stretches the grid of the rows it sits in, measured relative to each row's max.
    """
    w2 = np.abs(_weights(second).astype(np.float64))
    groups = int(second.attrs.get("group", 1))
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
    taps = w2.reshape(groups, per_group_out, per_group_in, -1).max(axis=3)      # (groups, out, in)
    rows = np.maximum(taps.max(axis=2, keepdims=True), 1e-30)
    return (taps / rows).mean(axis=1).reshape(-1)


def _row_ranges(first: gs.Node) -> np.ndarray:
    w1 = np.abs(_weights(first).astype(np.float64))
    return w1.reshape(w1.shape[0], -1).max(axis=1)


def _fill_silent(activation: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Channels that stayed zero on the calibration data get a range estimated from their weights.

    Left at scale 1, such a channel keeps whatever weight column the training left it, and one
    large column spoils the grid of every row it sits in; it costs the data nothing to move it,
    but other data may wake it, so it is scaled like its live neighbours rather than to the cap.
    """
    live = (activation > 0) & (rows > 0)
    if not live.any() or live.all():
        return activation
    typical = np.exp(np.median(np.log(activation[live] / rows[live])))
    return np.where(live, activation, rows * typical)


def _weight_scale(first: gs.Node, second: gs.Node) -> np.ndarray:
    r1, r2 = _row_ranges(first), _column_ranges(second)
    valid = (r1 > 0) & (r2 > 0)
    scale = np.ones(len(r1))
    scale[valid] = np.sqrt(r1[valid] / r2[valid])
    return scale


def _data_scale(activation: np.ndarray, columns: np.ndarray, depthwise: bool, config: EqualizeConfig) -> np.ndarray:
    valid = (activation > 0) & (columns > 0)
    scale = np.ones(len(activation))
    if not valid.any():
        return scale
    alpha = 1.0 if depthwise else config.alpha
    log_scale = alpha * np.log(activation[valid]) - (1.0 - alpha) * np.log(columns[valid])
    # Only ratios between channels matter (a common factor moves into the tensor's one scale),
    # so centre the scales on 1 before capping: the cap then bounds how far channels move apart.
    log_scale -= np.median(log_scale)
    # Channels within ``tolerance`` of the median are left where training put them: moving them
    # trades activation precision for weight precision at a rate absmax ranges measure poorly.
    band = np.log(config.tolerance)
    scale[valid] = np.exp(np.where(np.abs(log_scale) > band, log_scale, 0.0))
    return scale


def _apply(pair: Pair, scale: np.ndarray) -> None:
    """Channel i of the first conv's output divided by scale[i], input channel i of the second multiplied.

    Gate convs on the path read the divided channel, so their weights are multiplied back; constants
    added on the path are divided with the channel they are added to.
    """
    if np.all(scale == 1.0):
        return
    first, second = pair.first, pair.second
    w1 = _weights(first).astype(np.float64)
    w1 /= scale.reshape(-1, *([1] * (w1.ndim - 1)))
    _set(first, 1, w1.astype(np.float32))
    if len(first.inputs) > 2 and first.inputs[2] is not None and first.inputs[2].name:
        _set(first, 2, (constant_value(first.inputs[2]).astype(np.float64) / scale).astype(np.float32))
    for conv in (second, *pair.gates):
        _scale_columns(conv, scale)
    for node, index in pair.offsets:
        offset = channel_vector(constant_value(node.inputs[index]), len(scale), 1, w1.ndim) / scale
        _set(node, index, offset.reshape(1, -1, *([1] * (w1.ndim - 2))).astype(np.float32))


def _scale_columns(conv: gs.Node, scale: np.ndarray) -> None:
    """Input channel i of ``conv`` multiplied by scale[i], whatever its groups."""
    weight = _weights(conv).astype(np.float64)
    groups = int(conv.attrs.get("group", 1))
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
    grouped = weight.reshape(groups, per_group_out, per_group_in, -1)
    grouped *= scale.reshape(groups, 1, per_group_in, 1)
    _set(conv, 1, grouped.reshape(weight.shape).astype(np.float32))


def _set(node: gs.Node, index: int, value: np.ndarray) -> None:
    suffix = {1: "weight", 2: "bias"}.get(index, "offset") if node.op == "Conv" else "offset"
    inputs = list(node.inputs)
    inputs += [gs.Variable.empty()] * (index + 1 - len(inputs))   # a conv without a bias gets one
    base = node.name or node.outputs[0].name  # names must be unique across the graph
    inputs[index] = gs.Constant(f"{base}__equalized_{suffix}", np.ascontiguousarray(value))
    node.inputs = inputs
