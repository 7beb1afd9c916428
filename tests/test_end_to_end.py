"""quantize() on tiny torch nets: the QDQ model runs, stays close to float, and becomes integer kernels."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import onnxrepq
from onnxrepq.graph.io import save_model_atomic
from tests.models_for_tests import export_torch, run_ort, sqnr_db, structured_images

torch.manual_seed(0)
CALIBRATION = structured_images(32, seed=10)
HELD_OUT = structured_images(16, seed=11)


def conv_bn_relu(cin, cout, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def randomize_batch_norms(module):
    """Trained-looking BN statistics, so that folding them is not a no-op."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 1.5)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
    return module


class SmallNet(nn.Module):
    """conv+BN+ReLU, a residual add, depthwise+pointwise, and a Gemm head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.block = conv_bn_relu(8, 8)
        self.depthwise = conv_bn_relu(8, 8, groups=8)
        self.pointwise = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = self.pointwise(self.depthwise(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class HardSwishNet(nn.Module):
    """HardSwish spelled out as torch's older exports wrote it: x * relu6(x + 3) / 6."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.first(x)
        x = x * F.relu6(x + 3) / 6
        return self.second(x)


class PoolConcatResizeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn_relu(3, 8)
        self.left, self.right = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.out(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Output SQNR floors, in dB; measured values (2 CPU, onnxruntime 1.32) in the comments.
NETS = {
    "small": (SmallNet, 40.0),            # measured 50.3 dB
    "hardswish": (HardSwishNet, 25.0),    # measured 31.7 dB
    "pool_concat_resize": (PoolConcatResizeNet, 28.0),  # measured 36.3 dB
}


@pytest.fixture(scope="module")
def exported():
    return {name: export_torch(randomize_batch_norms(net()), CALIBRATION[:1]) for name, (net, _) in NETS.items()}


@pytest.fixture(scope="module")
def quantized(exported):
    return {name: onnxrepq.quantize(model, CALIBRATION) for name, model in exported.items()}


def ort_optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


@pytest.mark.parametrize("name", NETS)
def test_quantized_output_is_close_to_float(name, exported, quantized):
    reference = run_ort(exported[name], {"x": HELD_OUT})[0]
    result = run_ort(quantized[name], {"x": HELD_OUT})[0]
    assert result.shape == reference.shape
    assert sqnr_db(reference, result) >= NETS[name][1]


@pytest.mark.parametrize("name", NETS)
def test_every_conv_becomes_qlinearconv(name, quantized, tmp_path):
    model = quantized[name]
    outputs = {o.name for o in model.graph.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    # The planner leaves graph outputs unquantized, and QLinearConv needs a Q after the conv:
    # a conv that writes a graph output stays a float Conv (reported to the lead).
    last = [node for node in convs if node.output[0] in outputs]
    ops = ort_optimized_ops(model, tmp_path)
    assert len(convs) - len(last) >= 1 and ops["QLinearConv"] == len(convs) - len(last)
    assert ops["Conv"] + ops["FusedConv"] == len(last)


def test_gemm_head_becomes_integer_kernel(quantized, tmp_path):
    ops = ort_optimized_ops(quantized["small"], tmp_path)
    assert ops["QGemm"] + ops["QLinearMatMul"] + ops["MatMulInteger"] == 1
    assert ops["Gemm"] == 0 and ops["MatMul"] == 0


@pytest.mark.parametrize("name", NETS)
def test_qdq_layout(name, quantized):
    model = quantized[name]
    made_by = producers(model)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [node for node in model.graph.node if node.op_type in ("Conv", "Gemm")]
    for node in convs:
        weight_dq = made_by[node.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight = initializers[weight_dq.input[0]]
        axis = next(a.i for a in weight_dq.attribute if a.name == "axis")
        assert weight.dtype == np.int8 and weight.min() >= -127
        assert axis == (0 if node.op_type == "Conv" or node.op_type == "Gemm" and weight.shape[0] == 10 else 1)
        assert initializers[weight_dq.input[1]].size == weight.shape[axis]  # one scale per output channel
        if len(node.input) > 2:
            bias_dq = made_by[node.input[2]]
            assert bias_dq.op_type == "DequantizeLinear" and initializers[bias_dq.input[0]].dtype == np.int32
    activation_qs = [node for node in model.graph.node if node.op_type == "QuantizeLinear"]
    assert activation_qs and all(initializers[q.input[2]].dtype == np.uint8 for q in activation_qs)
    assert {p.key: p.value for p in model.metadata_props}["onnxrepq.version"] == onnxrepq.__version__


def test_hardswish_is_fused_before_quantization(quantized):
    """Fused into one HardSwish, which the ort-cpu target then writes as x * Clip(depthwise 1x1 conv(x), 0, 1);
    the Clip goes at emission, the quantizer after it holding [0, 1] already."""
    graph = quantized["hardswish"].graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["Div"] == 0 and ops["HardSigmoid"] == 0 and ops["HardSwish"] == 0
    assert ops["Clip"] == 0 and ops["Mul"] == 1
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node if n.op_type == "Conv"]
    assert sorted(groups) == [1, 1, 8]


def test_dynamic_batch_survives(quantized):
    for batch in (1, 5):
        assert run_ort(quantized["small"], {"x": HELD_OUT[:batch]})[0].shape == (batch, 10)


def test_quantize_is_deterministic(exported, quantized):
    again = onnxrepq.quantize(exported["small"], CALIBRATION)
    assert again.SerializeToString(deterministic=True) == quantized["small"].SerializeToString(deterministic=True)


class Reader:
    def __init__(self, samples):
        self.feeds = iter([{"x": samples[i:i + 4]} for i in range(0, len(samples), 4)])

    def get_next(self):
        return next(self.feeds, None)


def test_quantize_takes_a_proto_and_a_reader_and_leaves_the_proto_alone(exported, quantized, tmp_path):
    proto = exported["pool_concat_resize"]
    before = proto.SerializeToString(deterministic=True)
    from_reader = onnxrepq.quantize(proto, Reader(CALIBRATION))
    assert proto.SerializeToString(deterministic=True) == before
    # the same data as an array: the same model
    assert from_reader.graph.SerializeToString(deterministic=True) == \
        quantized["pool_concat_resize"].graph.SerializeToString(deterministic=True)
    path = save_model_atomic(proto, tmp_path / "float.onnx")
    from_path = onnxrepq.quantize(str(path), CALIBRATION)
    assert from_path.graph.SerializeToString(deterministic=True) == from_reader.graph.SerializeToString(
        deterministic=True)


class ConvLSTMNet(nn.Module):
    """A CRNN in miniature (conv features, an LSTM over the width, a linear head), as OCR recognizers export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=(4, 1), padding=1))
        self.lstm = nn.LSTM(8 * 4, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = self.conv(x)                                     # n, 8, 4, 16
        sequence = features.flatten(1, 2).transpose(1, 2)           # n, 16, 32
        return self.head(self.lstm(sequence)[0])


def test_default_recipe_reconstructs_around_an_op_torch_cannot_run(capsys, tmp_path):
    """The default recipe on a model with an LSTM (the issue's unseen OCR recognizer first failed with
    'the torch executor has no op LSTM', then fell back to --fast): the conv blocks are reconstructed,
    onnxruntime runs the LSTM's block, and the run says which blocks kept the scale search's values."""
    model = export_torch(ConvLSTMNet().eval(), CALIBRATION[:1], dynamic_batch=False)
    assert "LSTM" in {node.op_type for node in model.graph.node}
    path = tmp_path / "crnn.onnx"
    save_model_atomic(model, path)
    np.save(tmp_path / "calib.npy", CALIBRATION[:8])
    from onnxrepq.cli import main
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npy"),
                 "--report", str(tmp_path / "report")]) == 0
    assert "blocks were not reconstructed: the torch executor has no LSTM" in capsys.readouterr().err
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    recipe = {p.key: p.value for p in quantized.metadata_props}["onnxrepq.recipe"]
    assert '"fast": false' in recipe
    passes = {p["name"]: p for p in json.loads((tmp_path / "report" / "report.json").read_text())["passes"]}
    notes = passes["reconstruct_blocks"]["notes"]
    assert passes["reconstruct_blocks"]["modified"] and re.match(r"[1-9]\d* blocks in", notes[0]), notes
    assert "blocks were not reconstructed: the torch executor has no LSTM" in notes[1], notes
    feeds = {"x": HELD_OUT[:1]}
    assert sqnr_db(run_ort(model, feeds)[0], run_ort(quantized, feeds)[0]) > 20.0   # measured 44.7 dB
