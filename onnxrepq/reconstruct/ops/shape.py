"""Shape, layout and indexing ops, plus constants and casts."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F

from .registry import UnsupportedOpError, int_list, onnx_dtype_to_torch, register


def _optional(inputs, index):
    return inputs[index] if len(inputs) > index else None


@register("Reshape")
def reshape(inputs, attrs, node):
    x, shape = inputs[0], int_list(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]
    return x.reshape(shape)


@register("Transpose")
def transpose(inputs, attrs, node):
    x = inputs[0]
    return x.permute(attrs.get("perm", list(reversed(range(x.dim())))))


@register("Concat")
def concat(inputs, attrs, node):
    return torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])


@register("Flatten")
def flatten(inputs, attrs, node):
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@register("Slice")
def slice_(inputs, attrs, node):
    x = inputs[0]
    starts = int_list(_optional(inputs, 1)) or attrs.get("starts")   # attributes before opset 10
    ends = int_list(_optional(inputs, 2)) or attrs.get("ends")
    axes = int_list(_optional(inputs, 3)) or attrs.get("axes") or list(range(len(starts)))
    steps = int_list(_optional(inputs, 4)) or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # Python's slice.indices clamps exactly as the ONNX spec does, for either sign of step.
        first, stop, stride = slice(start, end, step).indices(x.shape[axis])
        index = torch.arange(first, stop, stride, device=x.device)
        x = x.index_select(axis % x.dim(), index)
    return x


@register("Split")
def split(inputs, attrs, node):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    sizes = int_list(_optional(inputs, 1)) or attrs.get("split")
    if not sizes:
        parts = attrs.get("num_outputs", len(node.outputs))
        chunk = -(-x.shape[axis] // parts)   # opset 18: the last part may be smaller
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return list(torch.split(x, list(sizes), dim=axis))


def _axes(inputs, attrs):
    return int_list(_optional(inputs, 1)) or attrs.get("axes")


@register("Squeeze")
def squeeze(inputs, attrs, node):
    x, axes = inputs[0], _axes(inputs, attrs)
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {a % x.dim() for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@register("Unsqueeze")
def unsqueeze(inputs, attrs, node):
    x, axes = inputs[0], _axes(inputs, attrs)
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return x.reshape(shape)


@register("Shape")
def shape(inputs, attrs, node):
    dims = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=inputs[0].device)


@register("Gather")
def gather(inputs, attrs, node):
    x, indices = inputs
    axis = attrs.get("axis", 0) % x.dim()
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    picked = x.index_select(axis, flat)
    return picked.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


@register("Cast")
def cast(inputs, attrs, node):
    return inputs[0].to(onnx_dtype_to_torch(attrs["to"]))


def _attr_value(value) -> torch.Tensor:
    array = np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return torch.from_numpy(np.array(array, copy=True))


@register("Constant")
def constant(inputs, attrs, node):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            tensor = _attr_value(attrs[key])
            if key in ("value_float", "value_floats"):
                return tensor.to(torch.float32)
            return tensor.to(torch.int64) if key.startswith("value_int") else tensor
    raise UnsupportedOpError(f"Constant {node.name!r} with attributes {sorted(attrs)}")


@register("ConstantOfShape")
def constant_of_shape(inputs, attrs, node):
    fill = _attr_value(attrs["value"]) if "value" in attrs else torch.zeros(1, dtype=torch.float32)
    return torch.full(int_list(inputs[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype, device=inputs[0].device)


@register("Expand")
def expand(inputs, attrs, node):
    x, target = inputs[0], int_list(inputs[1])
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    return x.expand(shape)


@register("Tile")
def tile(inputs, attrs, node):
    return inputs[0].repeat(int_list(inputs[1]))


@register("Range")
def range_(inputs, attrs, node):
    start, limit, delta = inputs
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@register("Pad")
def pad(inputs, attrs, node):
    x = inputs[0]
    pads = int_list(_optional(inputs, 1)) or list(attrs.get("pads"))
    value = _optional(inputs, 2)
    value = float(value.item()) if value is not None else attrs.get("value", 0.0)
    mode = attrs.get("mode", "constant")
    if mode != "constant":
        raise UnsupportedOpError(f"Pad mode {mode!r} (node {node.name!r}); only constant is supported")
    rank = x.dim()
    axes = int_list(_optional(inputs, 3)) or list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis % rank], ends[axis % rank] = pads[i], pads[i + len(axes)]
    torch_pads = [p for axis in reversed(range(rank)) for p in (begins[axis], ends[axis])]
    return F.pad(x, torch_pads, value=value)
