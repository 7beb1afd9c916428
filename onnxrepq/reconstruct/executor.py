"""Run an ONNX graph, or a block of one, as a torch module with onnxruntime's numbers.

Block-wise reconstruction needs to evaluate one block of the simulation graph many times with
some of its tensors replaced by learned ones (AdaRound weights, LSQ step sizes, an affine
correction). So the module keeps every initializer as a named buffer and its ``forward`` accepts
``overrides``: any tensor name, constant or intermediate, mapped to a torch tensor that is used
in its place (a node whose outputs are all overridden is not run). ``quantized_weights`` names
the float initializers behind a QuantizeLinear, the ones a learner will turn into parameters.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs
import torch

from ..errors import UserError
from .ops import op_function
from .ops.quant import quantize_linear

Feeds = Mapping[str, torch.Tensor]
_WIDENED = {"int4": np.int8, "uint4": np.uint8}


@dataclass(frozen=True)
class _Step:
    """One node as the module runs it: its function and the tensor names it reads and writes."""
    node: gs.Node
    inputs: tuple[Optional[str], ...]
    outputs: tuple[str, ...]


def select_nodes(graph: gs.Graph, inputs: Sequence[str], outputs: Sequence[str]) -> list[gs.Node]:
    """The nodes that compute ``outputs`` from ``inputs`` and constants, in topological order."""
    tensors = graph.tensors()
    missing = [name for name in list(inputs) + list(outputs) if name not in tensors]
    if missing:
        raise UserError(f"no tensor named {', '.join(map(repr, missing))} in the graph")
    boundary = set(inputs)
    chosen: dict[int, gs.Node] = {}
    pending = deque(tensors[name] for name in outputs)
    while pending:
        tensor = pending.popleft()
        if tensor.name in boundary or isinstance(tensor, gs.Constant):
            continue
        if not tensor.inputs:
            raise UserError(f"tensor {tensor.name!r} is needed but is neither an input of the block nor a constant")
        node = tensor.inputs[0]
        if id(node) in chosen:
            continue
        chosen[id(node)] = node
        pending.extend(t for t in node.inputs if t.name)
    return topological_order(list(chosen.values()))


def topological_order(nodes: list[gs.Node]) -> list[gs.Node]:
    """Kahn's order of ``nodes``, ties kept in the order given, so a sorted graph stays as it is."""
    members = {id(n) for n in nodes}
    waiting = {id(n): sum(1 for t in n.inputs for p in t.inputs if id(p) in members) for n in nodes}
    ready = deque(n for n in nodes if waiting[id(n)] == 0)
    ordered: list[gs.Node] = []
    while ready:
        node = ready.popleft()
        ordered.append(node)
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                if id(consumer) in waiting:
                    waiting[id(consumer)] -= 1
                    if waiting[id(consumer)] == 0:
                        ready.append(consumer)
    if len(ordered) != len(nodes):
        raise UserError("the graph has a cycle")
    return ordered


class GraphModule(torch.nn.Module):
    """A gs.Graph (or the part between ``inputs`` and ``outputs``) as a torch module.

    ``forward(feeds, overrides=None)`` takes and returns dicts keyed by tensor name. With
    ``ste=True`` every QuantizeLinear rounds with a straight-through gradient (LSQ's gradients
    for the scale); the forward numbers are the same either way.
    """

    def __init__(self, graph: gs.Graph, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None, ste: bool = False):
        super().__init__()
        self.input_names = list(inputs) if inputs is not None else [t.name for t in graph.inputs]
        self.output_names = list(outputs) if outputs is not None else [t.name for t in graph.outputs]
        nodes = select_nodes(graph, self.input_names, self.output_names)
        self.ste = ste
        self._buffer_of: dict[str, str] = {}
        self._steps = [self._plan(node) for node in nodes]

    def _plan(self, node: gs.Node) -> _Step:
        op_function(node)   # fail while building, naming the op, not in the middle of a run
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in self._buffer_of:
                self._register_constant(tensor)
        return _Step(node, tuple(t.name or None for t in node.inputs), tuple(t.name for t in node.outputs))

    def _register_constant(self, tensor: gs.Constant) -> None:
        values = np.asarray(tensor.values)
        if values.dtype.name in _WIDENED:   # torch has no 4-bit integers; the range comes from the ONNX type
            values = values.astype(_WIDENED[values.dtype.name])
        if values.dtype.kind not in "biuf":
            raise UserError(f"constant {tensor.name!r} has type {values.dtype} the torch executor cannot hold")
        buffer_name = f"constant_{len(self._buffer_of)}"
        self.register_buffer(buffer_name, torch.from_numpy(np.array(values, copy=True)))
        self._buffer_of[tensor.name] = buffer_name

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        """Every initializer the module reads, by its ONNX tensor name."""
        return {name: getattr(self, buffer) for name, buffer in self._buffer_of.items()}

    @property
    def nodes(self) -> list[gs.Node]:
        return [step.node for step in self._steps]

    def quantized_weights(self) -> dict[str, str]:
        """Float initializers that feed a QuantizeLinear, mapped to that node's name."""
        return {step.inputs[0]: step.node.name for step in self._steps
                if step.node.op == "QuantizeLinear" and step.inputs[0] in self._buffer_of}

    def forward(self, feeds: Feeds, overrides: Feeds | None = None) -> dict[str, torch.Tensor]:
        overrides = overrides or {}
        values: dict[str, torch.Tensor] = dict(self.constants)
        values.update(feeds)
        values.update(overrides)
        absent = [name for name in self.input_names if name not in values]
        if absent:
            raise UserError(f"no value fed for input {', '.join(map(repr, absent))}")
        for step in self._steps:
            if all(name in overrides for name in step.outputs):
                continue
            results = self._run(step, [values[name] if name else None for name in step.inputs])
            for name, result in zip(step.outputs, results):
                if name and name not in overrides:
                    values[name] = result
        return {name: values[name] for name in self.output_names}

    def _run(self, step: _Step, inputs: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
        node = step.node
        if node.op == "QuantizeLinear":
            result = quantize_linear(inputs, node.attrs, node, ste=self.ste)
        else:
            result = op_function(node)(inputs, node.attrs, node)
        return [result] if isinstance(result, torch.Tensor) else list(result)


def run_numpy(module: GraphModule, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convenience for tests and tools: numpy in, numpy out, no gradients."""
    with torch.no_grad():
        outputs = module({name: torch.from_numpy(np.asarray(value)) for name, value in feeds.items()})
    return {name: value.detach().cpu().numpy() for name, value in outputs.items()}
