"""Loading and saving models without ever touching the user's input file.

Saving goes to a temporary file in the destination folder followed by ``os.replace`` so that a run
killed at any moment leaves either the old file or the complete new one, never a partial model.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import onnx

from ..errors import ModelError, UserError
from .external import (checkable_copy, exceeds_protobuf, external_locations, point_at, uses_external_data,
                       write_weights)

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Return a private copy of the model, checked, with external data loaded."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        source = "<ModelProto>"
    else:
        path = Path(model)
        source = str(path)
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        if not path.is_file():
            raise ModelError(f"model path is not a file: {path}")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # protobuf raises several unrelated types on garbage input
            raise ModelError(f"cannot read {path} as an ONNX model ({_first_line(exc)})") from None
    if not proto.graph.node:
        raise ModelError(f"{source} holds no graph nodes (is it an ONNX model?)")
    _complete_output_shapes(proto)
    try:
        check_model(proto)
    except Exception as exc:
        raise ModelError(f"{source} is rejected by the ONNX checker: {_first_line(exc)}") from None
    _reject_unknown_domains(proto, source)
    _reject_map_values(proto, source)
    return proto


def has_external_data(model: ModelLike) -> bool:
    """Whether a model file keeps its weights in files beside it (the output then does too)."""
    if isinstance(model, onnx.ModelProto):
        return False
    try:
        return uses_external_data(onnx.load(str(model), load_external_data=False))
    except Exception:
        return False


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model, also for a model past protobuf's 2 GiB, which it cannot take as a
    proto: that one is checked without its weight bytes."""
    onnx.checker.check_model(checkable_copy(model) if exceeds_protobuf(model) else model)


def _complete_output_shapes(proto: onnx.ModelProto) -> None:
    """Give graph outputs that carry only an element type the shape onnx infers for them.

    Some exporters write outputs that way; onnxruntime runs them, but the ONNX checker requires a
    shape on every graph output, and the quantized model is checked before it is written.
    """
    bare = [out for out in proto.graph.output
            if out.type.HasField("tensor_type") and not out.type.tensor_type.HasField("shape")]
    if not bare or exceeds_protobuf(proto):
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:
        return  # the checker will name the output
    shapes = {out.name: out.type.tensor_type for out in inferred.graph.output
              if out.type.tensor_type.HasField("shape")}
    for out in bare:
        if out.name in shapes:
            out.type.tensor_type.shape.CopyFrom(shapes[out.name].shape)


def _reject_map_values(proto: onnx.ModelProto, source: str) -> None:
    # onnx-graphsurgeon writes a map type (ZipMap's seq(map(...)) output) back as a tensor of
    # undefined type, which onnxruntime then refuses to load ("Invalid tensor data type 0").
    for value in [*proto.graph.input, *proto.graph.output]:
        if _holds_map(value.type):
            raise ModelError(f"{source}: graph input/output {value.name!r} is a map or a sequence of maps"
                             " (ZipMap's output), which onnxrepq cannot carry; export the model without ZipMap")


def _holds_map(value_type: onnx.TypeProto) -> bool:
    if value_type.HasField("map_type"):
        return True
    if value_type.HasField("sequence_type"):
        return _holds_map(value_type.sequence_type.elem_type)
    return value_type.HasField("optional_type") and _holds_map(value_type.optional_type.elem_type)


def _reject_unknown_domains(proto: onnx.ModelProto, source: str) -> None:
    known = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    local_functions = {(f.domain, f.name) for f in proto.functions}
    for node in proto.graph.node:
        if node.domain not in known and (node.domain, node.op_type) not in local_functions:
            raise ModelError(
                f"{source} uses custom operator {node.domain}::{node.op_type} (node {node.name!r}),"
                " which onnxruntime cannot run without its extension library"
            )


def check_output_path(output: Union[str, os.PathLike], model: ModelLike | None = None) -> Path:
    """Refuse outputs that would overwrite the input or land in a missing folder, before any work."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise UserError(f"output path is a folder: {out}")
    if not out.parent.exists():
        raise UserError(f"output folder does not exist: {out.parent}")
    if model is not None and not isinstance(model, onnx.ModelProto):
        src = Path(model)
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise UserError(f"output path is the input model; choose another: {out}")
        if src.resolve() == out.resolve():
            raise UserError(f"output path is the input model; choose another: {out}")
    return out


def save_model_atomic(model: onnx.ModelProto, output: Union[str, os.PathLike], external_data: bool = False) -> Path:
    """Write the model next to its destination, then rename it into place.

    With ``external_data``, and always past protobuf's 2 GiB, the weights go to a data file beside
    the graph (see _save_external). The model passed in is not modified.
    """
    out = Path(output)
    if external_data or exceeds_protobuf(model):
        _save_external(model, out)
        return out
    with _temporary_beside(out, ".tmp") as tmp:
        with open(tmp, "wb") as handle:
            handle.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, out)
    return out


def _save_external(model: onnx.ModelProto, out: Path) -> None:
    """Graph to ``OUT``, weights to ``OUT.<digest of the weights>.data``, both written under temporary
    names first. A fixed data name would make replacing an earlier output non-atomic (a kill between
    the two renames would pair the old graph with the new weights); named by content, the old graph
    keeps its own data file until the new graph has replaced it, and only then is that file removed."""
    earlier = _own_data_files(out)
    with _temporary_beside(out, ".data.tmp") as tmp_data, _temporary_beside(out, ".tmp") as tmp:
        with open(tmp_data, "wb") as handle:
            light, digest = write_weights(model, handle)
        # no tensor large enough to move out (as with onnx.save_model's size_threshold): no data file
        location = f"{out.name}.{digest}.data" if uses_external_data(light) else ""
        point_at(light, location)
        with open(tmp, "wb") as handle:
            handle.write(light.SerializeToString(deterministic=True))
        if location:
            os.replace(tmp_data, out.parent / location)
        os.replace(tmp, out)
    for stale in earlier - {location}:
        (out.parent / stale).unlink(missing_ok=True)


@contextmanager
def _temporary_beside(out: Path, suffix: str) -> Iterator[Path]:
    """A fresh file ``.OUT.<random><suffix>`` in the destination's folder (the same file system, so
    os.replace is atomic), removed on the way out unless it was renamed into place."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=str(out.parent))
    os.close(fd)
    path = Path(name)
    # mkstemp makes the file private (0600); a serving process under another account must read the model.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _own_data_files(out: Path) -> set[str]:
    """Data files an earlier save of ours left for ``out``: only names of our own pattern, so a
    graph that points at someone else's weights (the input model's, say) never loses them."""
    if not out.is_file():
        return set()
    try:
        locations = external_locations(onnx.load(str(out), load_external_data=False))
    except Exception:
        return set()
    return {name for name in locations
            if name.startswith(f"{out.name}.") and name.endswith(".data") and "/" not in name and "\\" not in name}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
