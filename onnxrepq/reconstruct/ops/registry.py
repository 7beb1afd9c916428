"""The op-type -> torch function table and its error."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ...errors import UserError

Inputs = Sequence[Optional[torch.Tensor]]
OpResult = Union[torch.Tensor, Sequence[torch.Tensor]]
OpFunction = Callable[[Inputs, dict[str, Any], gs.Node], OpResult]

OPS: dict[str, OpFunction] = {}


class UnsupportedOpError(UserError):
    """The graph holds an op the torch executor cannot run."""


def register(*op_types: str) -> Callable[[OpFunction], OpFunction]:
    def wrap(function: OpFunction) -> OpFunction:
        for op_type in op_types:
            OPS[op_type] = function
        return function
    return wrap


def op_function(node: gs.Node) -> OpFunction:
    if node.domain not in ("", "ai.onnx", None):
        raise UnsupportedOpError(f"the torch executor has no op {node.domain}::{node.op} (node {node.name!r})")
    try:
        return OPS[node.op]
    except KeyError:
        raise UnsupportedOpError(f"the torch executor has no op {node.op!r} (node {node.name!r})") from None


def missing_ops(nodes) -> list[str]:
    """Op types among ``nodes`` that have no torch function (checked up front, before any block runs)."""
    missing = set()
    for node in nodes:
        try:
            op_function(node)
        except UnsupportedOpError:
            missing.add(node.op if node.domain in ("", "ai.onnx", None) else f"{node.domain}::{node.op}")
    return sorted(missing)


def int_list(tensor: Optional[torch.Tensor]) -> Optional[list[int]]:
    """A small integer input (axes, shape, pads) as a Python list."""
    return None if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def onnx_dtype_to_torch(onnx_type: int) -> torch.dtype:
    numpy_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, dtype=numpy_type)).dtype
