"""Per-layer weight bit-widths under a size or bit-operation budget, by inference only.

After RFQuant (arXiv 2401.01543), whose second stage needs no training: each layer's sensitivity
to each candidate width is measured by running the float model in onnxruntime with only that
layer's weight fake-quantized. Sensitivities are taken as additive (output noise powers add), a
layer's error at width b is measured once, so the whole search costs (layers x candidates) runs on
a handful of calibration samples.

Additivity is a first-order model and fails where the errors are large: on PP-OCRv4 rec at the
size of 4 bits the chosen widths read exact match 0.25 against uniform's 0.52 (BENCHMARKS.md run D).
So the chosen widths are run together once, and where that joint error is above the error of the
uniform width the budget allows, the knapsack runs again a few times with every layer pulled toward
that uniform width (a penalty per bit of distance), each choice is run together, and the best of
them is kept if it beats both; else uniform is kept, and the result says which. On rec a pulled
choice measured 0.302 against uniform's 0.331 (BENCHMARKS.md, session 12). (Measuring the
sensitivities around that uniform width instead of around float, every other weight quantized,
was tried: rec's choice still measured worse together, 0.347 against 0.331, and a small mobile
net lost 1 dB on held-out inputs. So was a greedy lowering that measures each step together, among
the four moves the alone errors rank cheapest: 0.344 on rec, and 13 minutes.)

The allocation is then a multiple-choice knapsack, solved exactly by dynamic programming over the
budget cut into 4096 units. The greedy rule (lower the layer with the least error per bit saved)
was tried first: with uneven curves it jumps a large layer to 2 bits because 3 bits cost the same,
and on a small mobile net its choice was predicted and measured worse than uniform 4-bit
(18.5 / 19.0 dB against 19.5 / 20.3). Greedy lowering remains for a second budget given together.

One onnxruntime session serves every measurement: the weights become graph inputs (an
initializer that is also an input is a default value that a feed overrides), so no model is
rebuilt per layer.

"Size" is the nominal storage of b bits per weight, as mixed-precision papers count it; in the
int8 containers onnxruntime runs, a 4-bit weight still occupies a byte on disk.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..calibrate.runner import session_for
from ..emit.placement import QuantPlan
from .criteria import weight_scales
from .quant_grid import IntGrid, fake_quant


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """A budget (size in MB of nominal weight storage, or bit operations in G) turns the search on."""
    budget_size_mb: Optional[float] = None
    budget_bitops_g: Optional[float] = None
    # The size budget as mean bits per weight (4.0: the size of uniform 4-bit), model-independent.
    budget_mean_bits: Optional[float] = None
    candidates: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    samples: int = 16                  # calibration feeds each sensitivity is measured on
    # Where the knapsack's widths measure worse together than uniform, the knapsack runs again with
    # each layer's error raised by pull x (mean error at the uniform width) per bit away from uniform,
    # once per pull, and the choice measured best together is kept if it beats them ((): uniform kept).
    uniform_pulls: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.budget_size_mb, self.budget_bitops_g, self.budget_mean_bits))


@dataclass
class LayerChoice:
    node: str
    params: int
    macs: int
    bits: int
    errors: dict[int, float]   # width -> relative output error (noise power / signal power) alone


@dataclass
class MixedPrecisionResult:
    layers: list[LayerChoice] = field(default_factory=list)
    size_mb: float = 0.0
    bitops_g: float = 0.0
    met_budget: bool = True
    seconds: float = 0.0
    uniform_bits: Optional[int] = None    # the widest uniform width within the budget
    uniform_error: float = float("nan")   # relative output error, every weight at uniform_bits
    joint_error: float = float("nan")     # the same, every weight at its chosen width (before any fallback)
    kept_uniform: bool = False            # the chosen widths measured worse together than uniform: uniform kept
    # where the knapsack's widths measured worse together than uniform and a choice pulled toward
    # uniform measured better than them: that pull (0: none) and what the knapsack's widths read
    pull: float = 0.0
    knapsack_error: float = float("nan")

    @property
    def bits(self) -> dict[str, int]:
        return {layer.node: layer.bits for layer in self.layers}


def choose_bit_widths(model: onnx.ModelProto, graph: gs.Graph, plan: QuantPlan, feeds: Iterable[Mapping],
                      config: MixedPrecisionConfig, grid_for: Callable[[int], IntGrid], activation_bits: int = 8,
                      progress: Optional[Callable[[int], None]] = None, weight_scale_search: str = "mse"
                      ) -> MixedPrecisionResult:
    """Pick a width per planned weight so that the budget holds and the summed sensitivity is least."""
    nodes = {node.name: node for node in graph.nodes}
    slots = [(slot, nodes[slot.node]) for slot in plan.weights]
    weights = {node.inputs[slot.input_index].name: node.inputs[slot.input_index].values for slot, node in slots}
    samples = list(itertools.islice(iter(feeds), config.samples))
    probe = _SensitivityProbe(model, list(weights), [n.outputs[0].name for _, n in slots])
    macs = probe.macs(samples[0], {node.outputs[0].name: (node.inputs[slot.input_index].values.size, node.op)
                                   for slot, node in slots})
    reference = probe.run(samples, weights)
    axes = {node.inputs[slot.input_index].name: slot.axis for slot, node in slots}

    def quantize(name: str, bits: int) -> np.ndarray:
        # the same scale search the emitted weight gets, so the error measured is the one shipped
        grid = grid_for(bits)
        scale = weight_scales(weights[name], axes[name], weight_scale_search, grid)
        shape = [1] * weights[name].ndim
        shape[axes[name]] = -1
        return fake_quant(weights[name].astype(np.float64), scale.reshape(shape), 0, grid).astype(np.float32)

    layers = [LayerChoice(node.name, int(node.inputs[slot.input_index].values.size), macs[node.outputs[0].name],
                          max(config.candidates), {}) for slot, node in slots]
    if config.budget_mean_bits is not None:
        size = sum(layer.params for layer in layers) * config.budget_mean_bits / 8e6
        config = replace(config, budget_size_mb=min(size, config.budget_size_mb or size))
    for layer, (slot, node) in zip(layers, slots):
        name = node.inputs[slot.input_index].name
        for bits in sorted(set(config.candidates)):
            layer.errors[bits] = _relative_error(reference, probe.run(samples, {**weights, name: quantize(name, bits)}))
            if progress:
                progress(1)
    quantized: dict[tuple[str, int], np.ndarray] = {}

    def measure(widths: Sequence[int]) -> float:
        """Relative output error with every layer at its width in ``widths`` together."""
        feed = {}
        for (slot, node), bits in zip(slots, widths):
            name = node.inputs[slot.input_index].name
            if (name, bits) not in quantized:
                quantized[name, bits] = quantize(name, bits)
            feed[name] = quantized[name, bits]
        return _relative_error(reference, probe.run(samples, feed))

    result = _allocate(layers, config, activation_bits)
    uniform = _uniform_width(layers, config, activation_bits)
    result.uniform_bits = uniform
    result.joint_error = measure([layer.bits for layer in layers])
    result.uniform_error = result.joint_error if {layer.bits for layer in layers} == {uniform} else \
        measure([uniform] * len(layers))
    if result.joint_error > result.uniform_error and config.uniform_pulls:
        pulled = _toward_uniform(layers, config, activation_bits, uniform, measure)
        if pulled is not None and pulled[1] < result.joint_error:
            for layer, bits in zip(layers, pulled[0]):
                layer.bits = bits
            size, bitops = _totals(layers, activation_bits)
            result = replace(result, size_mb=size, bitops_g=bitops, met_budget=True, joint_error=pulled[1],
                             knapsack_error=result.joint_error, pull=pulled[2])
    if result.joint_error > result.uniform_error and _fits(layers, config, activation_bits, uniform):
        for layer in layers:
            layer.bits = uniform
        size, bitops = _totals(layers, activation_bits)
        result = replace(result, size_mb=size, bitops_g=bitops, met_budget=True, kept_uniform=True)
    return result


def _totals(layers: Sequence[LayerChoice], activation_bits: int, bits: Optional[int] = None) -> tuple[float, float]:
    """(MB of nominal weight storage, G bit operations per sample) at the layers' widths, or all at ``bits``."""
    size = sum(layer.params * (bits or layer.bits) for layer in layers) / 8 / 1e6
    bitops = sum(layer.macs * (bits or layer.bits) * activation_bits for layer in layers) / 1e9
    return size, bitops


def _over_budget(config: MixedPrecisionConfig, size: float, bitops: float, slack: float = 0.0) -> bool:
    return (config.budget_size_mb is not None and size > config.budget_size_mb * (1 + slack)) or \
        (config.budget_bitops_g is not None and bitops > config.budget_bitops_g * (1 + slack))


def _fits(layers: Sequence[LayerChoice], config: MixedPrecisionConfig, activation_bits: int, bits: int) -> bool:
    """Whether every layer at ``bits`` keeps the budget (a budget of exactly uniform B bits fits B)."""
    return not _over_budget(config, *_totals(layers, activation_bits, bits), slack=1e-9)


def _uniform_width(layers: Sequence[LayerChoice], config: MixedPrecisionConfig, activation_bits: int) -> int:
    """The widest candidate that every layer can take within the budget (the narrowest when none fits)."""
    widths = sorted(set(config.candidates))
    return max((w for w in widths if _fits(layers, config, activation_bits, w)), default=widths[0])


def sensitivity_runs(plan: QuantPlan, config: MixedPrecisionConfig) -> int:
    """How many probe runs choose_bit_widths makes, less the one or two final checks (for a progress bar)."""
    return len(plan.weights) * len(set(config.candidates))


_UNITS = 4096


def _allocate(layers: list[LayerChoice], config: MixedPrecisionConfig, activation_bits: int) -> MixedPrecisionResult:
    """Least summed error under the size budget (or the bit-operation budget when only that is set)."""
    widths = sorted(set(config.candidates))
    if config.budget_size_mb is not None:
        budget, costs = config.budget_size_mb * 8e6, [[layer.params * w for w in widths] for layer in layers]
    else:
        budget = config.budget_bitops_g * 1e9
        costs = [[layer.macs * w * activation_bits for w in widths] for layer in layers]
    unit = max(budget, 1e-9) / _UNITS
    best = np.zeros(_UNITS + 1)          # least error of the layers so far within c units
    choices = []
    for layer, layer_costs in zip(layers, costs):
        new, pick = np.full(_UNITS + 1, np.inf), np.full(_UNITS + 1, -1, dtype=np.int16)
        for index, (width, cost) in enumerate(zip(widths, layer_costs)):
            units = int(round(cost / unit))
            if units > _UNITS:
                continue
            candidate = np.full(_UNITS + 1, np.inf)
            candidate[units:] = best[:_UNITS + 1 - units] + layer.errors[width]
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        choices.append(pick)
        best = new
    if np.isfinite(best[_UNITS]):
        capacity = _UNITS
        for layer, layer_costs, pick in reversed(list(zip(layers, costs, choices))):
            index = int(pick[capacity])
            layer.bits = widths[index]
            capacity -= int(round(layer_costs[index] / unit))
    else:
        for layer in layers:
            layer.bits = widths[0]
    # units are rounded to nearest so an exact fit stays feasible; greedy steps take back any overshoot
    return _greedy(layers, config, activation_bits)


def _greedy(layers: list[LayerChoice], config: MixedPrecisionConfig, activation_bits: int) -> MixedPrecisionResult:
    widths = sorted(set(config.candidates), reverse=True)
    size, bitops = _totals(layers, activation_bits)
    while _over_budget(config, size, bitops):
        best, best_cost = None, np.inf
        for layer in layers:
            saved = (layer.params if config.budget_size_mb is not None else 0) + \
                (layer.macs if config.budget_bitops_g is not None else 0)
            # Every lower width is a candidate step, not only the next one: sensitivity curves are
            # not convex (a layer may lose little from 8 to 5 bits and a lot at 6 with an unlucky grid).
            for step in (w for w in widths if w < layer.bits):
                cost = (layer.errors[step] - layer.errors[layer.bits]) / max(saved * (layer.bits - step), 1)
                if cost < best_cost:
                    best, best_cost = (layer, step), cost
        if best is None:
            break
        best[0].bits = best[1]
        size, bitops = _totals(layers, activation_bits)
    return MixedPrecisionResult(layers, size, bitops, not _over_budget(config, size, bitops))


def _toward_uniform(layers: list[LayerChoice], config: MixedPrecisionConfig, activation_bits: int, uniform: int,
                    measure: Callable[[Sequence[int]], float]) -> Optional[tuple[list[int], float, float]]:
    """The knapsack again with each layer's error raised in proportion to its distance from the uniform
    width, for a few strengths of that pull, each choice measured together; the best (widths, error, pull).

    The alone-measured errors mislead most where a choice strays far from uniform (many layers at 2 or
    3 bits whose errors compound), so the pulled choices trade the knapsack's freedom for additivity
    that holds; the strongest pull is uniform itself."""
    scale = float(np.mean([layer.errors[uniform] for layer in layers]))
    best = None
    for pull in config.uniform_pulls:
        pulled = [LayerChoice(layer.node, layer.params, layer.macs, layer.bits,
                              {bits: error + pull * scale * abs(bits - uniform) for bits, error in layer.errors.items()})
                  for layer in layers]
        choice = _allocate(pulled, config, activation_bits)
        widths = [layer.bits for layer in choice.layers]
        if choice.met_budget and set(widths) != {uniform}:
            error = measure(widths)
            if best is None or error < best[1]:
                best = (widths, error, pull)
    return best


def _relative_error(reference: Sequence[np.ndarray], value: Sequence[np.ndarray]) -> float:
    noise = sum(float(np.sum((r.astype(np.float64) - v) ** 2)) for r, v in zip(reference, value))
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return noise / max(signal, 1e-30)


class _SensitivityProbe:
    """The float model with its quantizable weights turned into overridable inputs."""

    def __init__(self, model: onnx.ModelProto, weight_names: list[str], layer_outputs: list[str]):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        existing = {value.name for value in probe.graph.input}
        initializers = {init.name: init for init in probe.graph.initializer}
        for name in weight_names:
            if name not in existing:
                init = initializers[name]
                probe.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
        self.outputs = [value.name for value in model.graph.output]
        self.layer_outputs = layer_outputs
        self.session = session_for(probe, layer_outputs)

    def run(self, samples: list[Mapping], weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = []
        for sample in samples:
            results.extend(self.session.run(self.outputs, {**sample, **weights}))
        return results

    def macs(self, sample: Mapping, layers: Mapping[str, tuple[int, str]]) -> dict[str, int]:
        """Multiply-accumulates per layer for one sample: weight size x output positions."""
        shapes = {name: value.shape for name, value in
                  zip(self.layer_outputs, self.session.run(self.layer_outputs, dict(sample)))}
        macs = {}
        for name, (size, op) in layers.items():
            shape = shapes[name]
            # Conv: [N, C, *spatial] -> the spatial positions; MatMul/Gemm: every leading row
            positions = np.prod(shape[2:]) if op in ("Conv", "ConvTranspose") else np.prod(shape[:-1])
            macs[name] = int(size) * max(int(positions), 1)
        return macs
