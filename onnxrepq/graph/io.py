"""Loading and saving models without ever touching the user's input file.

Saving goes to a temporary file in the destination folder followed by ``os.replace`` so that a run
killed at any moment leaves either the old file or the complete new one, never a partial model.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import onnx

from ..errors import ModelError, UserError

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

# protobuf cannot serialise a message over 2 GiB; past this size weights go to external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


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
    try:
        onnx.checker.check_model(proto if proto.ByteSize() < _EXTERNAL_DATA_THRESHOLD else str(model))
    except Exception as exc:
        raise ModelError(f"{source} is rejected by the ONNX checker: {_first_line(exc)}") from None
    _reject_unknown_domains(proto, source)
    _reject_map_values(proto, source)
    return proto


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


def save_model_atomic(model: onnx.ModelProto, output: Union[str, os.PathLike]) -> Path:
    """Write the model next to its destination, then rename it into place."""
    out = Path(output)
    large = model.ByteSize() > _EXTERNAL_DATA_THRESHOLD if _fits_protobuf(model) else True
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); the model should get the permissions any new file
    # of this user gets, so a serving process under another account can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    data_name = f"{out.name}.data"
    tmp_data = out.parent / f".{data_name}.tmp"
    try:
        if large:
            # External data is written under a temporary name too, then both are renamed.
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            _rename_external_location(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, out.parent / data_name)
        else:
            with open(tmp, "wb") as handle:
                handle.write(model.SerializeToString(deterministic=True))
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return out


def _rename_external_location(path: Path, old: str, new: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString(deterministic=True))


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
