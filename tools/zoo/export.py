"""ONNX export of zoo networks, keeping the training-form structure the quantizer must handle.

The TorchScript exporter is used (dynamo=False) with TrainingMode.EVAL and constant folding off:
with folding on, its eval peephole fuses Conv+BatchNormalization and the zoo would lose the
very BN nodes onnxrepq's fold pass is there to handle. Folding off leaves Identity nodes on
every weight and Shape->...->Pad chains for F.pad, so onnx-graphsurgeon's constant folding then
tidies those (it never touches BatchNormalization, whose data input is not constant).
"""

from __future__ import annotations

import collections
import io
import warnings
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def torchscript_export(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and constant-folding chatter
        torch.onnx.export(
            model.eval(), (example,), buffer,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False, dynamo=False,
        )
    return onnx.load_from_string(buffer.getvalue())


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    tidied = gs.export_onnx(graph)
    onnx.checker.check_model(tidied)
    return tidied


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def export_model(model: nn.Module, path: Path, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict[str, int]:
    """Writes `path` and returns its op counts, which the model card records."""
    exported = tidy(torchscript_export(model, torch.zeros(input_shape)))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(exported, path)
    return op_counts(exported)
