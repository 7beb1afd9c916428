"""The learned quantizers of one block: AdaRound rounding, LSQ activation steps, the QPR affine.

Each learned value reaches the torch executor as an ``override`` of a tensor of the simulation
graph, so the graph itself is not touched while learning:
- a weight's DequantizeLinear output becomes ``integers * scale * gamma``, with the integers
  ``clip(floor(W / s) + h(V), qmin, qmax)`` (AdaRound, Nagel et al. arXiv 2004.10568; h is the
  rectified sigmoid) or fixed at nearest rounding;
- an activation's scale constant becomes ``s0 * p`` (LSQ, arXiv 1902.08153: the straight-through
  QuantizeLinear of the executor gives p its gradient);
- a conv's float bias becomes ``b + beta`` (RepAPQ's QPR affine, arXiv 2402.16121).
``write_back`` stores the hard-rounded result in the graph's constants: the float weight as
exactly ``integers * s'`` with ``s' = s * gamma``, so that QuantizeLinear gives back the integers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ..search.quant_grid import IntGrid
from .executor import GraphModule

ZETA, GAMMA = 1.1, -0.1   # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _channel_shape(rank: int, axis: int) -> list[int]:
    shape = [1] * rank
    shape[axis % rank] = -1
    return shape


@dataclass
class WeightQuantizer:
    """One weight Q/DQ pair of the block and what is learned for it."""

    float_constant: gs.Constant
    scale_constant: gs.Constant
    output: str                          # the DequantizeLinear output the override replaces
    bias_constant: Optional[gs.Constant]
    axis: int
    grid: IntGrid
    adaround: bool
    affine: bool

    def __post_init__(self) -> None:
        weight = torch.from_numpy(np.array(self.float_constant.values, np.float32))
        scale = torch.from_numpy(np.array(self.scale_constant.values, np.float32)).reshape(-1)
        self.scale = scale.reshape(_channel_shape(weight.dim(), self.axis)) if scale.numel() > 1 else scale.reshape(())
        steps = weight / self.scale          # float32 division, as QuantizeLinear divides
        self.floor = torch.floor(steps)
        self.nearest = torch.clamp(torch.round(steps), self.grid.qmin, self.grid.qmax)
        self.rounding = None
        if self.adaround:
            rest = (steps - self.floor).clamp(0.0, 1.0)
            self.rounding = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0))
        channels = scale.numel() if self.affine and scale.numel() > 1 else 0
        self.log_gamma = torch.nn.Parameter(torch.zeros(channels)) if channels else None
        bias_size = self.bias_constant.values.size if self.bias_constant is not None else 0
        self.beta = torch.nn.Parameter(torch.zeros(channels)) if channels and bias_size == channels else None

    def integers(self, hard: bool) -> torch.Tensor:
        if self.rounding is None:
            return self.nearest
        h = rectified_sigmoid(self.rounding)
        h = (h >= 0.5).to(h.dtype) if hard else h
        return torch.clamp(self.floor + h, self.grid.qmin, self.grid.qmax)

    def effective_scale(self) -> torch.Tensor:
        if self.log_gamma is None:
            return self.scale
        return self.scale * torch.exp(self.log_gamma).reshape(self.scale.shape)

    def overrides(self, hard: bool) -> dict[str, torch.Tensor]:
        values = {self.output: self.integers(hard) * self.effective_scale()}
        if self.beta is not None:
            bias = torch.from_numpy(np.array(self.bias_constant.values, np.float32))
            values[self.bias_constant.name] = bias + self.beta
        return values

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's f_reg: pushes h(V) to 0 or 1 as beta falls."""
        h = rectified_sigmoid(self.rounding)
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).mean()

    def write_back(self) -> None:
        with torch.no_grad():
            scale = self.effective_scale()
            integers = self.integers(hard=True)
            weight = (integers * scale).numpy().astype(np.float32)
            # s' = s * gamma in float32; |q| <= 127 keeps |q*s'/s' - q| far below 1/2, so Q is exact
            self.scale_constant.values = scale.reshape(-1).numpy().astype(np.float32).reshape(
                self.scale_constant.values.shape)
            self.float_constant.values = weight
            if self.beta is not None:
                self.bias_constant.values = self.overrides(hard=True)[self.bias_constant.name].numpy()

    def learned_integers(self) -> np.ndarray:
        with torch.no_grad():
            return self.integers(hard=True).numpy().astype(np.int64)


@dataclass
class ActivationScale:
    """The scale constants of one group of activation quantizers that must stay equal, as one LSQ step.

    The step is learned relative to the searched one (s0 * p, p from 1), and without LSQ's gradient
    scale 1/sqrt(numel * qmax): Adam divides each element's gradient by its own running magnitude,
    so a constant factor on it would cancel.
    """

    constants: list[gs.Constant]
    floor: float = 0.0          # least relative step (ReconstructionConfig.activation_step_floor)

    def __post_init__(self) -> None:
        self.initial = torch.tensor(float(np.asarray(self.constants[0].values)), dtype=torch.float32)
        self.relative = torch.nn.Parameter(torch.ones(()))

    @property
    def least(self) -> float:
        return max(self.floor, 1e-3)

    def value(self) -> torch.Tensor:
        return self.initial * self.relative.clamp_min(self.least)

    def project(self) -> None:
        """Back onto the floor after an optimizer step, so a step pushed below it keeps its gradient
        (a clamp alone would leave the parameter stuck under the floor with none)."""
        with torch.no_grad():
            self.relative.clamp_(min=self.least)

    def overrides(self) -> dict[str, torch.Tensor]:
        value = self.value()
        return {constant.name: value.reshape(constant.values.shape) for constant in self.constants}

    def write_back(self) -> None:
        with torch.no_grad():
            value = self.value().numpy().astype(np.float32)
        for constant in self.constants:
            constant.values = value.reshape(constant.values.shape)


class BlockQuantizers:
    """Every learnable quantizer of one module (a block or a stage) of the simulation graph.

    Activation scale constants are grouped by (value, zero point): the planner gives tensors that
    must share a grid (a Concat's inputs and output) one ActivationQuant, and a runtime fuses such
    a node only when the scales are still equal after learning. Groups with a member quantized in
    an earlier (already learned) block are left fixed, since that block's outputs are cached.
    """

    def __init__(self, module: GraphModule, graph: gs.Graph, grid: IntGrid, frozen: set[str],
                 adaround: bool, affine: bool, learn_scales: bool, layer_grids: Mapping[str, IntGrid] = {},
                 step_floor: float = 0.0):
        constants = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
        self.weights: list[WeightQuantizer] = []
        self.scales: list[ActivationScale] = []
        for node in module.nodes:
            if node.op != "QuantizeLinear":
                continue
            if node.inputs[0].name in module.quantized_weights():
                self.weights.append(_weight_quantizer(node, grid, adaround, affine, layer_grids))
        if learn_scales:
            groups = _scale_groups(graph, constants)
            seen: set[str] = set()
            for node in module.nodes:
                name = node.inputs[1].name if node.op == "QuantizeLinear" else None
                if name is None or name in seen or node.inputs[0].name in module.quantized_weights():
                    continue
                group = groups.get(name, [])
                seen.update(c.name for c in group)
                if group and not any(c.name in frozen for c in group):
                    self.scales.append(ActivationScale(group, step_floor))

    def parameter_groups(self, weight_lr: float, scale_lr: float, affine_lr: float) -> list[dict]:
        groups = [
            {"params": [w.rounding for w in self.weights if w.rounding is not None], "lr": weight_lr},
            {"params": [s.relative for s in self.scales], "lr": scale_lr},
            {"params": [p for w in self.weights for p in (w.log_gamma, w.beta) if p is not None], "lr": affine_lr},
        ]
        return [group for group in groups if group["params"]]

    def overrides(self, hard: bool) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for weight in self.weights:
            values.update(weight.overrides(hard))
        for scale in self.scales:
            values.update(scale.overrides())
        return values

    def reset(self) -> None:
        """Back to the scale search's result: nearest rounding, searched steps, no affine."""
        with torch.no_grad():
            for weight in self.weights:
                weight.rounding = None
                for parameter in (weight.log_gamma, weight.beta):
                    if parameter is not None:
                        parameter.zero_()
            for scale in self.scales:
                scale.relative.fill_(1.0)

    def project(self) -> None:
        for scale in self.scales:
            scale.project()

    def regulariser(self, beta: float) -> torch.Tensor:
        terms = [w.regulariser(beta) for w in self.weights if w.rounding is not None]
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def write_back(self) -> list[str]:
        """Store the hard result in the graph; returns the scale constants now fixed."""
        for weight in self.weights:
            weight.write_back()
        for scale in self.scales:
            scale.write_back()
        return [c.name for s in self.scales for c in s.constants]


def _weight_quantizer(node: gs.Node, grid: IntGrid, adaround: bool, affine: bool,
                      layer_grids: Mapping[str, IntGrid]) -> WeightQuantizer:
    dequantize = next(c for c in node.outputs[0].outputs if c.op == "DequantizeLinear")
    layer = dequantize.outputs[0].outputs[0] if dequantize.outputs[0].outputs else None
    if layer is not None:
        # the layer's own width where widths differ (mixed precision, per-node overrides): the
        # weight arrives pre-clipped to it, but AdaRound could still round its edge values outward
        grid = layer_grids.get(layer.name, grid)
    bias = None
    if layer is not None and layer.op == "Conv" and len(layer.inputs) > 2 and isinstance(layer.inputs[2], gs.Constant):
        bias = layer.inputs[2]
    axis = int(node.attrs.get("axis", 1))
    # the QPR affine scales output channels: a Conv's weight axis 0 and its bias
    learn_affine = affine and layer is not None and layer.op == "Conv" and axis == 0
    return WeightQuantizer(node.inputs[0], node.inputs[1], dequantize.outputs[0].name, bias, axis, grid,
                           adaround, learn_affine)


def _scale_groups(graph: gs.Graph, constants: dict[str, gs.Constant]) -> dict[str, list[gs.Constant]]:
    """Activation QuantizeLinear scale constants keyed by name, grouped by equal (scale, zero point)."""
    by_value: dict[tuple, list[gs.Constant]] = {}
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        scale, zero_point = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
        if not isinstance(scale, gs.Constant) or np.asarray(scale.values).size != 1:
            continue
        key = (np.asarray(scale.values).tobytes(), None if zero_point is None else
               np.asarray(zero_point.values).tobytes())
        group = by_value.setdefault(key, [])
        if all(c is not scale for c in group):
            group.append(scale)
    return {c.name: group for group in by_value.values() for c in group}
