"""Models whose weights live beside the graph: sizes, and writing them without touching the proto.

``onnx.save_model(save_as_external_data=True)`` rewrites the proto it is given (the weight bytes
are moved out and the tensors point at the file), so a model saved that way can no longer be run
or reported on; and protobuf refuses to serialise or even size a message past 2 GiB. The helpers
here read tensor sizes from their dims and write a light copy of the graph, leaving the caller's
model as it was.
"""
from __future__ import annotations

import hashlib
import math
from typing import BinaryIO, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

# protobuf cannot serialise a message over 2 GiB; past this size weights must go to external data.
PROTOBUF_LIMIT = 1_800_000_000
# Tensors smaller than this stay inside the graph file, as onnx.save_model's size_threshold does.
INLINE_BYTES = 1024
# Page-aligned offsets let a reader memory-map each tensor.
_ALIGNMENT = 4096


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the proto, from their dims: ByteSize() walks every byte
    and can fail past 2 GiB."""
    return sum(_tensor_bytes(tensor) for tensor in model.graph.initializer)


def exceeds_protobuf(model: onnx.ModelProto) -> bool:
    return weight_bytes(model) > PROTOBUF_LIMIT


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether a proto loaded without its external data points at weight files."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers; the weights are not copied."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
    return light


def checkable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the ONNX checker accepts in place of a model past 2 GiB: each large initializer
    becomes an empty tensor of its name (the checker reads neither dims nor bytes without
    full_check)."""
    light = without_initializers(model)
    for tensor in model.graph.initializer:
        if _tensor_bytes(tensor) < INLINE_BYTES:
            light.graph.initializer.add().CopyFrom(tensor)
        else:
            light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=[0])
    return light


def write_weights(model: onnx.ModelProto, data_file: BinaryIO,
                  extra_outputs: Sequence[str] = ()) -> tuple[onnx.ModelProto, str]:
    """Write every initializer of INLINE_BYTES or more to ``data_file``; return the light graph
    pointing at it (its location still blank: see point_at) and a digest of the bytes written,
    so that a caller can name the data file by its content.

    ``extra_outputs`` are appended as untyped graph outputs (onnxruntime infers them).
    """
    light = without_initializers(model)
    digest = hashlib.blake2b(digest_size=8)
    for tensor in model.graph.initializer:
        if _tensor_bytes(tensor) < INLINE_BYTES:
            light.graph.initializer.add().CopyFrom(tensor)
            continue
        raw = _raw_bytes(tensor)
        data_file.write(b"\0" * (-data_file.tell() % _ALIGNMENT))
        offset = data_file.tell()
        data_file.write(raw)
        digest.update(raw)
        stub = light.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                           doc_string=tensor.doc_string)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", ""), ("offset", str(offset)), ("length", str(len(raw)))):
            stub.external_data.add(key=key, value=value)
        del raw
    present = {o.name for o in light.graph.output}
    light.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra_outputs if name not in present)
    return light, digest.hexdigest()


def point_at(light: onnx.ModelProto, location: str) -> None:
    """Name the data file (relative to the graph's folder) in every tensor write_weights moved out."""
    for tensor in light.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The weight files a proto loaded without its external data points at."""
    return {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0  # not loaded: its bytes are not in the proto
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return tensor.ByteSize()
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # sub-byte and float8 types: small, and ByteSize is exact
        return tensor.ByteSize()
    return math.prod(tensor.dims) * itemsize


def _copy_field(target, field, value) -> None:
    if field.type == field.TYPE_MESSAGE and not _is_repeated(value):
        getattr(target, field.name).CopyFrom(value)
    elif _is_repeated(value):
        getattr(target, field.name).extend(value)
    else:
        setattr(target, field.name, value)


def _is_repeated(value) -> bool:
    return hasattr(value, "extend") and not isinstance(value, (str, bytes))

