"""The torch executor against onnxruntime: every supported op, QDQ bit-exactness, real models."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, version_converter

from onnxrepq.reconstruct.executor import GraphModule, run_numpy
from onnxrepq.reconstruct.fake_quant import INT_RANGES, fake_quantize
from onnxrepq.reconstruct.ops import UnsupportedOpError

from .helpers import max_error, one_node_model, relative_error, run_ort

TOLERANCE = 1e-5
rng = np.random.default_rng(0)


def rand(*shape, low=-1.0, high=1.0):
    return rng.uniform(low, high, size=shape).astype(np.float32)


def ints(*values):
    return np.array(values, dtype=np.int64)


def case(op, inputs, attrs=None, outputs=(("y", TensorProto.FLOAT),), opset=13, id=None):
    return pytest.param(op, inputs, attrs or {}, outputs, opset, id=id or op)


INT64_OUT = (("y", TensorProto.INT64),)
BOOL_OUT = (("y", TensorProto.BOOL),)
x4 = lambda: ("x", rand(2, 3, 8, 8), False)  # noqa: E731

OP_CASES = [
    case("Conv", [x4(), ("w", rand(4, 3, 3, 3), True), ("b", rand(4), True)], {"pads": [1, 1, 1, 1]}),
    case("Conv", [x4(), ("w", rand(6, 1, 3, 3), True)], {"group": 3, "strides": [2, 2], "dilations": [2, 2],
                                                        "pads": [0, 1, 2, 1]}, id="Conv-groups-asym"),
    case("Conv", [x4(), ("w", rand(4, 3, 3, 2), True)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="Conv-same"),
    case("Conv", [("x", rand(1, 2, 9), False), ("w", rand(3, 2, 3), True)], {"auto_pad": "SAME_LOWER"}, id="Conv-1d"),
    case("ConvTranspose", [x4(), ("w", rand(3, 2, 3, 3), True), ("b", rand(2), True)],
         {"strides": [2, 2], "pads": [1, 0, 1, 2], "output_padding": [1, 1]}),
    case("ConvTranspose", [x4(), ("w", rand(3, 1, 2, 2), True)], {"strides": [2, 2], "group": 3}, id="ConvT-groups"),
    case("ConvTranspose", [x4(), ("w", rand(3, 2, 3, 3), True)], {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
         id="ConvT-same"),
    case("ConvTranspose", [x4(), ("w", rand(3, 2, 3, 2), True)], {"dilations": [2, 1], "output_shape": [18, 15],
                                                                   "strides": [2, 2]}, id="ConvT-output-shape"),
    case("Gemm", [("a", rand(4, 5), False), ("b", rand(5, 3), True)], id="Gemm-plain"),
    case("Gemm", [("a", rand(4, 5), False), ("b", rand(3, 4), True), ("c", rand(3), True)],
         {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    case("MatMul", [("a", rand(2, 3, 4, 5), False), ("b", rand(5, 6), True)]),
    case("Add", [x4(), ("b", rand(3, 1, 1), True)]),
    case("Sub", [x4(), ("b", rand(8), False)]),
    case("Mul", [x4(), ("b", rand(1, 3, 1, 1), True)]),
    case("Div", [x4(), ("b", rand(3, 1, 1, low=0.5, high=2.0), True)]),
    case("Div", [("x", ints(7, -7, 9), True), ("b", ints(2, 2, -4), True)], outputs=INT64_OUT, id="Div-int"),
    case("Pow", [("x", rand(3, 4, low=0.1, high=2.0), False), ("p", np.array(2.0, np.float32), True)]),
    case("Sqrt", [("x", rand(3, 4, low=0.0, high=4.0), False)]),
    *[case(op, [x4()]) for op in ("Exp", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Erf", "Identity")],
    case("LeakyRelu", [x4()], {"alpha": 0.2}),
    case("PRelu", [x4(), ("s", rand(3, 1, 1), True)]),
    case("Clip", [x4(), ("lo", np.array(-0.3, np.float32), True), ("hi", np.array(0.4, np.float32), True)]),
    case("Clip", [x4(), ("", None, True), ("hi", np.array(0.4, np.float32), True)], id="Clip-max-only"),
    case("HardSigmoid", [("x", rand(2, 50, low=-6, high=6), False)], {"alpha": 1 / 6, "beta": 0.5}),
    case("HardSwish", [("x", rand(2, 50, low=-6, high=6), False)], opset=14),
    case("Softmax", [x4()], {"axis": 1}),
    case("Softmax", [("x", rand(2, 5, 7, low=-20, high=20), False)], id="Softmax-last"),
    case("ReduceMean", [x4()], {"axes": [2, -1], "keepdims": 1}),
    case("ReduceSum", [x4(), ("axes", ints(1), True)], {"keepdims": 0}),
    case("ReduceSum", [x4()], id="ReduceSum-all"),
    case("Reshape", [x4(), ("s", ints(0, -1, 4), True)]),
    case("Reshape", [("x", rand(0, 3), False), ("s", ints(3, 0), True)], {"allowzero": 1}, opset=14,
         id="Reshape-allowzero"),
    case("Transpose", [x4()], {"perm": [0, 2, 3, 1]}),
    case("Concat", [x4(), ("b", rand(2, 1, 8, 8), True)], {"axis": 1}),
    case("Slice", [x4(), ("st", ints(1, -3), True), ("en", ints(100, -1), True), ("ax", ints(2, 3), True),
                   ("sp", ints(2, 1), True)]),
    case("Slice", [x4(), ("st", ints(-1), True), ("en", ints(-100), True), ("ax", ints(1), True),
                   ("sp", ints(-1), True)], id="Slice-reverse"),
    case("Split", [x4(), ("sp", ints(1, 2), True)], {"axis": 1},
         outputs=(("y", TensorProto.FLOAT), ("z", TensorProto.FLOAT))),
    case("Split", [x4()], {"axis": 2, "num_outputs": 3}, opset=18,
         outputs=(("y", TensorProto.FLOAT), ("z", TensorProto.FLOAT), ("w", TensorProto.FLOAT)), id="Split-num"),
    case("Squeeze", [("x", rand(2, 1, 3, 1), False), ("ax", ints(-1), True)]),
    case("Squeeze", [("x", rand(2, 1, 3, 1), False)], id="Squeeze-all"),
    case("Unsqueeze", [("x", rand(2, 3), False), ("ax", ints(0, -1), True)]),
    case("Flatten", [x4()], {"axis": 2}),
    case("Shape", [x4()], outputs=INT64_OUT),
    case("Shape", [x4()], {"start": 1, "end": -1}, outputs=INT64_OUT, opset=15, id="Shape-slice"),
    case("Gather", [x4(), ("i", ints(2, -1, 0), True)], {"axis": 2}),
    case("Gather", [("x", rand(5, 3), False), ("i", np.array([[0, 4], [1, 1]], np.int64), True)], id="Gather-2d"),
    case("Cast", [x4()], {"to": TensorProto.INT64}, outputs=INT64_OUT),
    case("Erf", [("x", rand(4, 4, low=-3, high=3), False)], id="Erf-wide"),
    case("MaxPool", [x4()], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    case("MaxPool", [x4()], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [0, 1, 2, 0], "ceil_mode": 1},
         id="MaxPool-asym-ceil"),
    case("MaxPool", [x4()], {"kernel_shape": [2, 2], "dilations": [2, 2], "auto_pad": "SAME_LOWER"},
         id="MaxPool-dilated-same"),
    case("MaxPool", [("x", rand(2, 3, 9), False)], {"kernel_shape": [3], "strides": [2], "pads": [1, 0]}, id="MaxPool-1d"),
    case("AveragePool", [("x", rand(2, 3, 9), False)], {"kernel_shape": [2], "strides": [2], "ceil_mode": 1},
         id="AveragePool-1d"),
    case("AveragePool", [x4()], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    case("AveragePool", [x4()], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                 "count_include_pad": 1}, id="AveragePool-include"),
    case("AveragePool", [x4()], {"kernel_shape": [3, 2], "strides": [3, 2], "ceil_mode": 1}, id="AveragePool-ceil"),
    case("AveragePool", [x4()], {"kernel_shape": [3, 3], "pads": [0, 1, 2, 1]}, id="AveragePool-asym"),
    case("GlobalAveragePool", [x4()]),
    case("GlobalMaxPool", [x4()]),
    case("Resize", [x4(), ("", None, True), ("sc", np.array([1, 1, 2, 2], np.float32), True)],
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    case("Resize", [x4(), ("", None, True), ("sc", np.array([1, 1, 1.5, 0.75], np.float32), True)],
         {"mode": "nearest", "coordinate_transformation_mode": "half_pixel"}, id="Resize-nearest-half"),
    case("Resize", [x4(), ("", None, True), ("", None, True), ("sz", ints(2, 3, 5, 13), True)],
         {"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "round_prefer_ceil"},
         id="Resize-nearest-sizes"),
    case("Resize", [x4(), ("", None, True), ("sc", np.array([1, 1, 2, 1.5], np.float32), True)],
         {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, id="Resize-linear-half"),
    case("Resize", [x4(), ("", None, True), ("", None, True), ("sz", ints(2, 3, 5, 13), True)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, id="Resize-linear-align"),
    case("Resize", [x4(), ("", None, True), ("sc", np.array([1, 1, 0.5, 2], np.float32), True)],
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, id="Resize-linear-pt"),
    case("Resize", [("x", rand(1, 2, 7, 9), False), ("", None, True), ("", None, True), ("sz", ints(1, 2, 4, 5), True)],
         {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"}, id="Resize-nearest-tf"),
    case("Resize", [("x", rand(1, 2, 7, 9), False), ("", None, True), ("", None, True), ("sz", ints(1, 2, 14, 3), True)],
         {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
         id="Resize-nearest-ceil"),
    case("Pad", [x4(), ("p", ints(1, 2, 0, 3), True), ("", None, True), ("ax", ints(1, -1), True)], opset=18,
         id="Pad-axes"),
    case("Pad", [x4(), ("p", ints(0, 0, 1, 2, 0, 1, 3, 0), True), ("v", np.array(0.5, np.float32), True)]),
    case("BatchNormalization", [x4(), ("s", rand(3), True), ("b", rand(3), True), ("m", rand(3), True),
                                ("v", rand(3, low=0.1, high=2), True)], {"epsilon": 1e-3}),
    case("LayerNormalization", [("x", rand(2, 5, 16), False), ("s", rand(16), True), ("b", rand(16), True)],
         {"axis": -1}, opset=17),
    case("Where", [("c", rng.uniform(size=(3, 4)) > 0.5, True), ("a", rand(3, 4), False), ("b", rand(4), True)]),
    case("Equal", [("a", ints(1, 2, 3), True), ("b", ints(1, 0, 3), True)], outputs=BOOL_OUT),
    case("Expand", [("x", rand(3, 1), False), ("s", ints(2, 1, 4), True)]),
    case("Tile", [("x", rand(2, 3), False), ("r", ints(2, 3), True)]),
    case("ConstantOfShape", [("s", ints(2, 3), True)],
         {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])}),
    case("Range", [("a", np.array(1, np.int64), True), ("b", np.array(10, np.int64), True),
                   ("d", np.array(3, np.int64), True)], outputs=INT64_OUT),
    case("Range", [("a", np.array(0.5, np.float32), True), ("b", np.array(-2, np.float32), True),
                   ("d", np.array(-0.5, np.float32), True)], id="Range-float"),
    case("Constant", [], {"value": helper.make_tensor("v", TensorProto.FLOAT, [2, 2], [1, 2, 3, 4])}),
]


@pytest.mark.parametrize("op, inputs, attrs, outputs, opset", OP_CASES)
def test_op_matches_onnxruntime(op, inputs, attrs, outputs, opset):
    model, feeds = one_node_model(op, inputs, attrs, outputs, opset)
    assert max_error(model, feeds) <= TOLERANCE


def _qdq_model(x_shape, scale, zero_point, axis=1):
    """x -> QuantizeLinear -> DequantizeLinear, plus the quantized integers as a second output."""
    zp_name = "zp" if zero_point is not None else ""
    inits = [onnx.numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    if zero_point is not None:
        inits.append(onnx.numpy_helper.from_array(zero_point, "zp"))
    qtype = helper.np_dtype_to_tensor_dtype(zero_point.dtype) if zero_point is not None else TensorProto.UINT8
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", zp_name], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "s", zp_name], ["y"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("q", qtype, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _assert_qdq_exact(model, x):
    expected = run_ort(model, {"x": x})
    actual = run_numpy(GraphModule(gs.import_onnx(model)), {"x": x})
    assert np.array_equal(actual["q"], expected["q"].astype(np.float32))
    assert np.array_equal(actual["y"], expected["y"])   # bit-identical after dequantization


def test_qdq_per_tensor_uint8_with_zero_point_is_bit_exact():
    x = rand(2, 3, 16, 16, low=-3, high=5)
    _assert_qdq_exact(_qdq_model(x.shape, 0.0173, np.array(37, np.uint8)), x)


@pytest.mark.parametrize("axis", [0, 1])
def test_qdq_per_channel_int8_is_bit_exact(axis):
    x = rand(4, 6, 5, 5, low=-2, high=2)
    scale = rng.uniform(0.001, 0.02, size=x.shape[axis]).astype(np.float32)
    _assert_qdq_exact(_qdq_model(x.shape, scale, np.zeros(x.shape[axis], np.int8), axis), x)


def test_qdq_rounds_ties_to_even_and_saturates():
    scale = np.float32(0.5)
    steps = np.array([-300.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 400.0], np.float32)
    x = (steps * scale).reshape(1, -1)   # exact multiples of half a step: every value is a tie
    _assert_qdq_exact(_qdq_model(x.shape, scale, np.array(0, np.int8)), x)
    _assert_qdq_exact(_qdq_model(x.shape, scale, np.array(128, np.uint8)), x)
    _assert_qdq_exact(_qdq_model(x.shape, scale, None), x)


@pytest.mark.parametrize("qtype", [TensorProto.INT4, TensorProto.UINT4], ids=["int4", "uint4"])
def test_qdq_four_bit_saturates_like_onnxruntime(qtype):
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "qdq4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                                           helper.make_tensor("zp", qtype, [], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = (np.arange(40, dtype=np.float32).reshape(1, 40) - 20) * 0.05   # -1.0 .. 0.95, ties included
    expected = run_ort(model, {"x": x})["y"]
    assert np.array_equal(run_numpy(GraphModule(gs.import_onnx(model)), {"x": x})["y"], expected)


def test_straight_through_gradients_are_lsq():
    x = torch.tensor([-10.0, -0.26, 0.26, 0.74, 10.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    out = fake_quantize(x, scale, torch.tensor(0.0), INT_RANGES["int4"], ste=True)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]          # clipped values pass no gradient
    steps = (x.detach() / 0.5)
    expected = (-8.0 + 7.0 + (torch.round(steps[1:4]) - steps[1:4]).sum()).item()
    assert scale.grad.item() == pytest.approx(expected, abs=1e-6)


def test_overrides_replace_a_weight_and_unknown_ops_are_named():
    model, feeds = one_node_model("Conv", [("x", rand(1, 2, 5, 5), False), ("w", rand(3, 2, 1, 1), True)])
    module = GraphModule(gs.import_onnx(model))
    x = torch.from_numpy(feeds["x"])
    zero = module({"x": x}, overrides={"w": torch.zeros(3, 2, 1, 1)})["y"]
    assert float(zero.abs().max()) == 0.0 and "w" in module.constants
    bad, _ = one_node_model("Einsum", [("x", rand(2, 2), False)], {"equation": "ii->i"})
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        GraphModule(gs.import_onnx(bad))


# --- whole models shipped with rapidocr-onnxruntime -------------------------------------------

def _rapidocr_models() -> str | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    return os.path.join(os.path.dirname(spec.origin), "models") if spec and spec.origin else None


MODELS = _rapidocr_models()
# Required, not skipped: the README's test command runs after `pip install --no-deps rapidocr-onnxruntime`
# (fixture in tests/reconstruct/conftest.py).
needs_rapidocr = pytest.mark.usefixtures("rapidocr_models")


def load_folded(file_name: str) -> gs.Graph:
    """A shipped PP-OCR model at opset 13 with constants folded, as the pipeline sees it."""
    model = version_converter.convert_version(onnx.load(os.path.join(MODELS, file_name)), 13)
    return gs.import_onnx(model).fold_constants().cleanup()


WHOLE_MODELS = [("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 160)), ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 96, 96)),
                ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192))]


@needs_rapidocr
@pytest.mark.parametrize("file_name, shape", WHOLE_MODELS, ids=[name.split("_infer")[0] for name, _ in WHOLE_MODELS])
def test_whole_model_matches_onnxruntime(file_name, shape):
    graph = load_folded(file_name)
    x = np.random.default_rng(1).uniform(0, 1, size=shape).astype(np.float32)
    expected = run_ort(gs.export_onnx(graph), {graph.inputs[0].name: x})
    actual = run_numpy(GraphModule(graph), {graph.inputs[0].name: x})
    # Against a magnitude of at least 1: det's output is a probability map that is all but zero on
    # random input, where MLAS's rational sigmoid approximation returns 0 for what is ~1e-11.
    error = max(relative_error(actual[name], value, floor=1.0) for name, value in expected.items())
    print(f"{file_name}: max error {error:.2e}")
    assert error <= 1e-4


def test_learnable_overrides_get_gradients_through_a_qdq_block():
    """A learner swaps the weight and the activation step for parameters and trains through QDQ."""
    x_scale = np.float32(0.02)
    graph = gs.Graph(opset=13)
    x = gs.Variable("x", np.float32, [1, 2, 5, 5])
    weight = gs.Constant("w", rand(3, 2, 3, 3))
    w_scale, w_zero = gs.Constant("ws", np.full(3, 0.01, np.float32)), gs.Constant("wz", np.zeros(3, np.int8))
    a_scale, a_zero = gs.Constant("as", np.array(x_scale)), gs.Constant("az", np.array(128, np.uint8))
    xq, xd, wq, wd = (gs.Variable(n) for n in ("xq", "xd", "wq", "wd"))
    y = gs.Variable("y", np.float32)
    graph.nodes = [gs.Node("QuantizeLinear", "qx", inputs=[x, a_scale, a_zero], outputs=[xq]),
                   gs.Node("DequantizeLinear", "dqx", inputs=[xq, a_scale, a_zero], outputs=[xd]),
                   gs.Node("QuantizeLinear", "qw", {"axis": 0}, [weight, w_scale, w_zero], [wq]),
                   gs.Node("DequantizeLinear", "dqw", {"axis": 0}, [wq, w_scale, w_zero], [wd]),
                   gs.Node("Conv", "conv", {"pads": [1, 1, 1, 1]}, [xd, wd], [y])]
    graph.inputs, graph.outputs = [x], [y]
    module = GraphModule(graph, ste=True)
    assert module.quantized_weights() == {"w": "qw"}
    learned_weight = torch.nn.Parameter(module.constants["w"].clone())
    learned_step = torch.nn.Parameter(module.constants["as"].clone())
    feeds = {"x": torch.from_numpy(rand(1, 2, 5, 5))}
    out = module(feeds, overrides={"w": learned_weight, "as": learned_step})["y"]
    out.abs().mean().backward()
    assert learned_weight.grad is not None and float(learned_weight.grad.abs().sum()) > 0
    assert learned_step.grad is not None and float(learned_step.grad.abs()) > 0
    reference = run_ort(gs.export_onnx(graph), {"x": feeds["x"].numpy()})["y"]
    assert relative_error(out.detach().numpy(), reference) <= TOLERANCE
