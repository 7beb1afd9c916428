"""FuseParallelBranches: training-form blocks exported from torch fuse into their deploy form."""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

# `tools` lives at the repository root; drop this once pyproject sets pythonpath = ["."]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from onnxrepq.passes.channel_affine import fold_channel_affine
from onnxrepq.passes.constants import ConstantsToInitializers
from onnxrepq.passes.fold_affine import ChannelAffine
from onnxrepq.passes.fold_constants import FoldConstants
from onnxrepq.passes.fuse_branches import FuseParallelBranches
from tools.zoo.blocks import (  # noqa: E402
    ACBlock, DBBBlock, MobileOneBlock, QARepVGGBlock, RepVGGBlock, randomize_bn)

torch.set_num_threads(1)
# torch's TorchScript exporter warns that it is legacy; the brief pins it (dynamo=False) on purpose
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _export(model: torch.nn.Module, channels: int, seed: int) -> onnx.ModelProto:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    randomize_bn(model, generator).eval()
    buffer = io.BytesIO()
    x = torch.randn(1, channels, 10, 11, generator=generator)
    torch.onnx.export(model, x, buffer, training=torch.onnx.TrainingMode.EVAL,
                      do_constant_folding=False, opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    return onnx.load_from_string(buffer.getvalue())


def _fuse(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FuseParallelBranches, list[str]]:
    graph = gs.import_onnx(model)
    for normalise in (ConstantsToInitializers(), FoldConstants()):
        graph = normalise(graph).graph
    fuse = FuseParallelBranches()
    result = fuse(graph)
    fused = gs.export_onnx(result.graph)
    onnx.checker.check_model(fused)
    return fused, fuse, result.notes


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _relative_error(before: onnx.ModelProto, after: onnx.ModelProto, channels: int) -> float:
    rng = np.random.default_rng(1)
    worst = 0.0
    for size in ((9, 12), (13, 10)):  # odd and even sizes: every stride/padding border case
        x = rng.standard_normal((2, channels, *size)).astype(np.float32)
        expected, actual = _run(before, x), _run(after, x)
        assert expected.shape == actual.shape
        worst = max(worst, float(np.abs(expected - actual).max() / np.abs(expected).max()))
    return worst


def _ops(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


def _deploy_convs(blocks: list[torch.nn.Module]) -> list[tuple]:
    """(group, kernel, stride) of every conv in the torch deploy form, sorted."""
    convs = [m for b in blocks for m in b.reparameterize().modules() if isinstance(m, torch.nn.Conv2d)]
    return sorted((c.groups, *c.kernel_size, *c.stride) for c in convs)


def _onnx_convs(model: onnx.ModelProto) -> list[tuple]:
    convs = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            convs.append((attrs.get("group", 1), *attrs["kernel_shape"], *attrs.get("strides", [1, 1])))
    return sorted(convs)


CASES = {
    "repvgg": (lambda: torch.nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 8)), 8),
    "repvgg_strided": (lambda: RepVGGBlock(8, 16, stride=2), 8),
    "repvgg_grouped": (lambda: torch.nn.Sequential(RepVGGBlock(8, 8, groups=4),
                                                   RepVGGBlock(8, 16, stride=2, groups=2)), 8),
    "repvgg_depthwise": (lambda: RepVGGBlock(8, 8, groups=8), 8),
    "qarepvgg": (lambda: torch.nn.Sequential(QARepVGGBlock(8, 8), QARepVGGBlock(8, 16, stride=2)), 8),
    "acnet": (lambda: torch.nn.Sequential(ACBlock(8, 8), ACBlock(8, 16, stride=2, groups=2)), 8),
    "dbb": (lambda: torch.nn.Sequential(DBBBlock(8, 8), DBBBlock(8, 16, stride=2, groups=2)), 8),
    "dbb_5x5": (lambda: DBBBlock(8, 8, kernel=5), 8),
    "mobileone": (lambda: torch.nn.Sequential(MobileOneBlock(8, 8, k=3),
                                              MobileOneBlock(8, 16, stride=2, k=3)), 8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_form_becomes_deploy_form(case):
    build, channels = CASES[case]
    block = build()
    original = _export(block, channels, seed=len(case))
    fused, fuse, notes = _fuse(original)
    expected_convs = _deploy_convs(list(block) if isinstance(block, torch.nn.Sequential) else [block])
    assert _onnx_convs(fused) == expected_convs
    assert _ops(fused, "BatchNormalization") == 0
    assert _ops(fused, "Add") == 0
    assert _relative_error(original, fused, channels) < 1e-4
    assert all(group.fused for group in fuse.last_groups), notes
    assert len(fuse.fused_nodes) == len(expected_convs)
    assert all(np.all(g.affine.scale == 1) and np.all(g.affine.shift == 0) for g in fuse.last_groups)


# --- graphs built by hand: every op kind the pass claims, and what it must refuse -------------

C = 4
RNG = np.random.default_rng(7)


def _const(name: str, shape, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _conv(x, y, weight, **attrs):
    return helper.make_node("Conv", [x, weight] if "bias" not in attrs else [x, weight, attrs.pop("bias")],
                            [y], name=y, **attrs)


def _graph_model(nodes, initializers, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C, "h", "w"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"]) for o in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_every_linear_op_kind_fuses_into_one_conv():
    initializers = [
        _const("w_dilated", (C, C, 3, 3)), _const("w_same", (C, C, 5, 5)), _const("w_padded", (C, C, 3, 3)),
        _const("b_padded", (C,)), _const("channel_scale", (C, 1, 1)), _const("channel_shift", (1, C, 1, 1)),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
    ]
    nodes = [
        _conv("x", "dilated", "w_dilated", dilations=[2, 2], pads=[2, 2, 2, 2]),
        _conv("x", "same", "w_same", auto_pad="SAME_UPPER"),
        helper.make_node("Mul", ["x", "channel_scale"], ["scaled"]),
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant"),
        _conv("padded", "padded_conv", "w_padded", bias="b_padded"),
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("Add", ["channel_shift", "pooled"], ["pooled_shifted"]),
        helper.make_node("Sum", ["dilated", "same", "scaled", "padded_conv", "pooled_shifted"], ["y"]),
    ]
    original = _graph_model(nodes, initializers)
    fused, fuse, notes = _fuse(original)
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    conv = fused.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"][0] == [5, 5]
    assert _relative_error(original, fused, C) < 1e-4
    assert "5 branches [conv3x3, conv5x5, identity+scale, pad+conv3x3, avgpool3x3+shift]" in notes[0]


def _refused(nodes, initializers, outputs=("y",)):
    original = _graph_model(nodes, initializers, outputs)
    fused, fuse, notes = _fuse(original)
    groups = [g for g in fuse.last_groups if len(g.branches) > 1]
    assert len(groups) == 1 and not groups[0].fused
    assert _ops(fused, "Add") == 1
    assert _relative_error(original, fused, C) < 1e-4
    return groups[0].reason, notes


def test_branch_with_relu_inside_is_left_alone():
    initializers = [_const("w3", (C, C, 3, 3)), _const("w1", (C, C, 1, 1))]
    nodes = [_conv("x", "a", "w3", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["a_relu"]),
             _conv("x", "b", "w1"), helper.make_node("Add", ["a_relu", "b"], ["y"])]
    reason, notes = _refused(nodes, initializers)
    assert "Relu is not a fusable linear op" in reason
    assert any("2 branches [conv3x3+Relu, conv1x1]: not fused" in note for note in notes)


def test_zero_padding_after_a_bias_is_left_alone():
    initializers = [_const("w1", (C, C, 1, 1)), _const("b1", (C,)), _const("w3", (C, C, 3, 3)),
                    _const("w3_direct", (C, C, 3, 3))]
    nodes = [_conv("x", "a", "w1", bias="b1"), _conv("a", "a3", "w3", pads=[1, 1, 1, 1]),
             _conv("x", "b", "w3_direct", pads=[1, 1, 1, 1]), helper.make_node("Add", ["a3", "b"], ["y"])]
    reason, notes = _refused(nodes, initializers)
    assert "zero-pads after a bias" in reason
    # the 1x1 -> 3x3 chain alone is refused for the same reason, so three convs remain
    assert sum("zero-pads after a bias" in note for note in notes) == 2


def test_branch_output_used_elsewhere_is_left_alone():
    initializers = [_const("w3", (C, C, 3, 3)), _const("w1", (C, C, 1, 1))]
    nodes = [_conv("x", "a", "w3", pads=[1, 1, 1, 1]), _conv("x", "b", "w1"),
             helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Relu", ["a"], ["side"])]
    reason, _ = _refused(nodes, initializers, outputs=("y", "side"))
    assert reason == "branch 0: a is also used outside the group"


def test_average_pool_that_excludes_padding_is_left_alone():
    initializers = [_const("w3", (C, C, 3, 3))]
    nodes = [_conv("x", "a", "w3", pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    reason, _ = _refused(nodes, initializers)
    assert "count_include_pad=0" in reason


# --- QPR affine ----------------------------------------------------------------------------

def test_qpr_affine_folds_into_scale_and_bias_without_touching_integer_weights():
    weight = torch.from_numpy(RNG.standard_normal((6, C, 3, 3)).astype(np.float32))
    bias = RNG.standard_normal(6).astype(np.float32)
    weight_scale = (weight.abs().amax(dim=(1, 2, 3)) / 127).numpy()
    integers = torch.round(weight / torch.from_numpy(weight_scale).reshape(-1, 1, 1, 1))
    affine = ChannelAffine(RNG.uniform(0.5, 2.0, 6).astype(np.float32), RNG.standard_normal(6).astype(np.float32))

    new_scale, new_bias = fold_channel_affine(weight_scale, bias, affine)

    scale_4d = torch.from_numpy(new_scale).reshape(-1, 1, 1, 1)
    assert torch.equal(torch.round(integers * scale_4d / scale_4d), integers)
    x = torch.from_numpy(RNG.standard_normal((2, C, 7, 7)).astype(np.float32))
    dequantized = integers * torch.from_numpy(weight_scale).reshape(-1, 1, 1, 1)
    expected = torch.nn.functional.conv2d(x, dequantized, torch.from_numpy(bias), padding=1)
    expected = expected * torch.from_numpy(affine.scale).reshape(1, -1, 1, 1) \
        + torch.from_numpy(affine.shift).reshape(1, -1, 1, 1)
    folded = torch.nn.functional.conv2d(x, integers * scale_4d, torch.from_numpy(new_bias), padding=1)
    assert float((folded - expected).abs().max() / expected.abs().max()) < 1e-5
    assert not np.allclose(new_scale, weight_scale)  # the fold did change the scale


def test_qpr_affine_refuses_a_negative_scale():
    affine = ChannelAffine(np.array([1.0, -1.0]), np.zeros(2))
    with pytest.raises(ValueError, match="positive"):
        fold_channel_affine(np.ones(2), np.zeros(2), affine)
