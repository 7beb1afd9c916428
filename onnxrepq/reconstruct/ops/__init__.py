"""ONNX ops in torch, one registry keyed by op type.

Each op is a plain function ``(inputs, attrs, node) -> tensor or list of tensors``: ``inputs`` are
torch tensors in ONNX order with ``None`` for an omitted optional input, ``attrs`` is the node's
attribute dict. Semantics follow opsets 13-17 and onnxruntime's CPU kernels where the spec leaves
room (rounding, clamping), because the executor is only useful if it agrees with onnxruntime.
"""
from __future__ import annotations

from .registry import OPS, UnsupportedOpError, missing_ops, op_function

# Importing the modules fills the registry.
from . import elementwise, nn, pool, quant, resize, shape  # noqa: E402,F401

__all__ = ["OPS", "UnsupportedOpError", "missing_ops", "op_function"]
