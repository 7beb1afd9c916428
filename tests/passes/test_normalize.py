"""The normalisation passes, one tiny model each: same numbers before and after, and the expected graph."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxrepq.passes.cleanup import Cleanup
from onnxrepq.passes.constants import ConstantsToInitializers
from onnxrepq.passes.fold_affine import FoldAffineIntoConv
from onnxrepq.passes.fold_constants import FoldConstants
from onnxrepq.passes.fuse_hardswish import FuseHardSwish
from onnxrepq.passes.opset import UpgradeOpset
from tests.models_for_tests import (apply_passes, assert_same_outputs, make_model, op_types, positive, rng,
                                    weights)

FOLD_RTOL = 1e-4


def feed(**shapes) -> dict:
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_constant_nodes_become_initializers():
    value = weights(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["c_value"], value=numpy_helper.from_array(value)),
        helper.make_node("Constant", [], ["c_float"], value_float=2.5),
        helper.make_node("Constant", [], ["c_ints"], value_ints=[3, 2]),
        helper.make_node("Add", ["x", "c_value"], ["a"]),
        helper.make_node("Mul", ["a", "c_float"], ["m"]),
        helper.make_node("Reshape", ["m", "c_ints"], ["y"]),
    ]
    model = make_model(nodes, {"x": [2, 3]}, ["y"])
    after, records = apply_passes(model, [ConstantsToInitializers()])
    assert op_types(after) == ["Add", "Mul", "Reshape"]
    assert records[0].modified and records[0].notes == ["3 Constant nodes made initializers"]
    initializers = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    np.testing.assert_array_equal(initializers["c_value"], value)
    assert initializers["c_float"].dtype == np.float32 and float(initializers["c_float"]) == 2.5
    assert initializers["c_ints"].dtype == np.int64 and initializers["c_ints"].tolist() == [3, 2]
    assert_same_outputs(model, after, feed(x=(2, 3)))


@pytest.mark.parametrize("opset", [11, 12])
def test_opset_upgrade_moves_axes_to_inputs(opset):
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
        helper.make_node("ReduceMean", ["u"], ["r"], axes=[3], keepdims=1),
        helper.make_node("Squeeze", ["r"], ["y"], axes=[0, 4]),
    ]
    model = make_model(nodes, {"x": [2, 3, 4, 1]}, ["y"], opset=opset)
    after, records = apply_passes(model, [UpgradeOpset()])
    assert after.opset_import[0].version == 13
    assert records[0].notes == [f"opset {opset} -> 13"]
    # Squeeze and Unsqueeze take axes as an input from 13 on; ReduceMean keeps its attribute until 18.
    by_op = {node.op_type: node for node in after.graph.node}
    assert len(by_op["Squeeze"].input) == 2 and len(by_op["Unsqueeze"].input) == 2
    assert not any(a.name == "axes" for a in by_op["Squeeze"].attribute)
    inputs = feed(x=(2, 3, 4, 1))
    assert_same_outputs(model, after, inputs, rtol=0.0)


def test_opset_13_is_left_alone():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": [2]}, ["y"])
    _, records = apply_passes(model, [UpgradeOpset()])
    assert not records[0].modified


def _reshape_by_shape_model(batch):
    """y = Reshape(x, [x.shape[0], -1]) computed through Shape -> Gather -> Concat."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "index"], ["g"], axis=0),
        helper.make_node("Concat", ["g", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"index": np.array([0], np.int64), "minus_one": np.array([-1], np.int64)}
    return make_model(nodes, {"x": [batch, 3, 4]}, ["y"], inits)


def test_fold_constants_folds_static_shape_chain():
    model = _reshape_by_shape_model(2)
    after, records = apply_passes(model, [FoldConstants()])
    assert op_types(after) == ["Reshape"]
    target = next(t for t in after.graph.initializer if t.name == after.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [2, -1]
    assert records[0].notes == ["3 nodes folded"]
    assert_same_outputs(model, after, feed(x=(2, 3, 4)), rtol=0.0)


def test_fold_constants_keeps_dynamic_shape_chain():
    model = _reshape_by_shape_model("n")
    after, records = apply_passes(model, [FoldConstants()])
    assert op_types(after) == ["Shape", "Gather", "Concat", "Reshape"]
    assert not records[0].modified
    assert_same_outputs(model, after, feed(x=(5, 3, 4)), rtol=0.0)


def test_cleanup_removes_inner_identity():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("Sigmoid", ["i"], ["y"])]
    model = make_model(nodes, {"x": [4]}, ["y"])
    after, _ = apply_passes(model, [Cleanup()])
    assert op_types(after) == ["Relu", "Sigmoid"]
    assert_same_outputs(model, after, feed(x=(4,)), rtol=0.0)


def test_cleanup_keeps_graph_output_name_of_identity():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    model = make_model(nodes, {"x": [4]}, ["y"])
    after, _ = apply_passes(model, [Cleanup()])
    assert op_types(after) == ["Relu"]
    assert [o.name for o in after.graph.output] == ["y"]
    assert list(after.graph.node[0].output) == ["y"]
    assert_same_outputs(model, after, feed(x=(4,)), rtol=0.0)


def test_cleanup_keeps_identity_between_input_and_output():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], {"x": [4]}, ["y"])
    after, _ = apply_passes(model, [Cleanup()])
    assert op_types(after) == ["Identity"] and after.graph.output[0].name == "y"


# ---- FoldAffineIntoConv: each case is (nodes, inputs, initializers, feed shapes, ops expected after)

C = 4


def _conv(out="c", group=1, pads=(1, 1, 1, 1), kernel=3, source="x", in_channels=C):
    return ([helper.make_node("Conv", [source, "w", "b"], [out], pads=list(pads), group=group)],
            {"w": weights(C, in_channels // group, kernel, kernel), "b": weights(C)})


def _bn(source, out, channels=C):
    return ([helper.make_node("BatchNormalization", [source, "gamma", "beta", "mean", "var"], [out])],
            {"gamma": positive(channels), "beta": weights(channels), "mean": weights(channels),
             "var": positive(channels)})


def _conv_bn():
    conv, conv_inits = _conv()
    bn, bn_inits = _bn("c", "y")
    return conv + bn, {"x": ["n", C, 6, 6]}, conv_inits | bn_inits, ["Conv"]


def _conv_mul_add():
    conv, inits = _conv()
    nodes = conv + [helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    return nodes, {"x": ["n", C, 6, 6]}, inits | {"s": np.float32(1.7), "t": weights(1, C, 1, 1)}, ["Conv"]


def _conv_constant_first_mul():
    conv, inits = _conv()
    nodes = conv + [helper.make_node("Mul", ["s", "c"], ["y"])]
    return nodes, {"x": ["n", C, 6, 6]}, inits | {"s": positive(1, C, 1, 1)}, ["Conv"]


def _gemm_mul(trans_b):
    weight = weights(C, 5) if trans_b else weights(5, C)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=trans_b),
             helper.make_node("Mul", ["g", "s"], ["y"])]
    return nodes, {"x": ["n", 5]}, {"w": weight, "b": weights(C), "s": weights(C)}, ["Gemm"]


def _conv_transpose_bn():
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2])]
    bn, bn_inits = _bn("c", "y")
    return nodes + bn, {"x": ["n", 3, 5, 5]}, {"w": weights(3, C, 3, 3), "b": weights(C)} | bn_inits, \
        ["ConvTranspose"]


def _affine_then_pointwise(group):
    conv, inits = _conv(pads=(0, 0, 0, 0), kernel=1, group=group, source="a", out="y")
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"])] + conv
    return nodes, {"x": ["n", C, 6, 6]}, inits | {"s": weights(1, C, 1, 1), "t": weights(1, C, 1, 1)}, ["Conv"]


def _affine_before_padded_conv(op):
    """A scale folds into a padded conv (0 * a = 0); a shift would reach the zero border."""
    conv, inits = _conv(source="m", out="y")
    nodes = [helper.make_node(op, ["x", "s"], ["m"])] + conv
    return nodes, {"x": ["n", C, 6, 6]}, inits | {"s": positive(1, C, 1, 1)}, ["Conv"] + (["Add"] if op == "Add" else [])


def _constant_first(op):
    conv, inits = _conv()
    nodes = conv + [helper.make_node(op, ["k", "c"], ["y"])]
    return nodes, {"x": ["n", C, 6, 6]}, inits | {"k": positive(1, C, 1, 1) + 3}, ["Conv", op]


def _conv_output_used_twice():
    conv, inits = _conv()
    bn, bn_inits = _bn("c", "y")
    nodes = conv + bn + [helper.make_node("Relu", ["c"], ["z"])]
    return nodes, {"x": ["n", C, 6, 6]}, inits | bn_inits, ["Conv", "BatchNormalization", "Relu"]


AFFINE_CASES = {
    "conv_bn": _conv_bn,
    "conv_mul_scalar_add_vector": _conv_mul_add,
    "conv_mul_constant_first": _conv_constant_first_mul,
    "gemm_transB0_mul": lambda: _gemm_mul(0),
    "gemm_transB1_mul": lambda: _gemm_mul(1),
    "conv_transpose_bn": _conv_transpose_bn,
    "mul_add_pointwise_conv": lambda: _affine_then_pointwise(1),
    "mul_add_grouped_pointwise_conv": lambda: _affine_then_pointwise(2),
    "mul_before_padded_conv": lambda: _affine_before_padded_conv("Mul"),
    "not_add_before_padded_conv": lambda: _affine_before_padded_conv("Add"),
    "not_sub_constant_first": lambda: _constant_first("Sub"),
    "not_div_constant_first": lambda: _constant_first("Div"),
    "not_conv_output_used_twice": _conv_output_used_twice,
}


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_fold_affine(case):
    nodes, inputs, inits, expected_ops = AFFINE_CASES[case]()
    outputs = [o for o in ("y", "z") if any(o in n.output for n in nodes)]
    model = make_model(nodes, inputs, outputs, inits)
    after, records = apply_passes(model, [FoldAffineIntoConv()])
    assert sorted(op_types(after)) == sorted(expected_ops)
    assert records[0].modified == (not case.startswith("not_"))
    shapes = {name: [3 if not isinstance(d, int) else d for d in shape] for name, shape in inputs.items()}
    assert_same_outputs(model, after, feed(**shapes), rtol=FOLD_RTOL)


# ---- FuseHardSwish

def _hardswish_nodes(clip_first: bool, divide: bool, extra_clip_user: bool = False):
    product = ["clip", "x"] if clip_first else ["x", "clip"]
    nodes = [helper.make_node("Add", ["x", "three"], ["shifted"]),
             helper.make_node("Clip", ["shifted", "zero", "six"], ["clip"]),
             helper.make_node("Mul", product, ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"]) if divide
             else helper.make_node("Mul", ["m", "sixth"], ["y"])]
    if extra_clip_user:
        nodes.append(helper.make_node("Neg", ["clip"], ["z"]))
    inits = {"three": np.float32(3), "zero": np.float32(0), "six": np.float32(6), "sixth": np.float32(1 / 6)}
    return nodes, inits


@pytest.mark.parametrize("opset, expected", [(13, ["HardSigmoid", "Mul"]), (14, ["HardSwish"])])
@pytest.mark.parametrize("clip_first", [False, True])
@pytest.mark.parametrize("divide", [False, True])
def test_fuse_hardswish(opset, expected, clip_first, divide):
    nodes, inits = _hardswish_nodes(clip_first, divide)
    model = make_model(nodes, {"x": [2, 64]}, ["y"], inits, opset=opset)
    after, records = apply_passes(model, [FuseHardSwish()])
    assert op_types(after) == expected
    assert records[0].notes == ["1 HardSwish patterns fused"]
    inputs = {"x": np.linspace(-5, 5, 128, dtype=np.float32).reshape(2, 64)}
    assert_same_outputs(model, after, inputs)


def test_hardswish_not_fused_when_clip_output_is_used_elsewhere():
    nodes, inits = _hardswish_nodes(False, True, extra_clip_user=True)
    model = make_model(nodes, {"x": [2, 64]}, ["y", "z"], inits, opset=14)
    after, records = apply_passes(model, [FuseHardSwish()])
    assert sorted(op_types(after)) == sorted(op_types(model))
    assert not records[0].modified


def test_hardswish_fused_after_graph_import_keeps_output_name():
    nodes, inits = _hardswish_nodes(False, True)
    model = make_model(nodes, {"x": [8]}, ["y"], inits, opset=14)
    after, _ = apply_passes(model, [FuseHardSwish()])
    graph = gs.import_onnx(after)
    assert [o.name for o in graph.outputs] == ["y"] and graph.nodes[0].outputs[0].name == "y"
