"""Blocks and stages found from structure alone: residual units stay whole, budgets hold, shapes split stages."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from onnxrepq.reconstruct.executor import GraphModule
from onnxrepq.reconstruct.partition import partition

from .helpers import relative_error
from .test_executor import load_folded, needs_rapidocr

rng = np.random.default_rng(0)


class NetBuilder:
    """A conv net written op by op with gs, image layout NCHW, 8 channels throughout."""

    def __init__(self, size=(16, 16), dynamic=False, quantized_weights=False):
        shape = ["n", 8, "h", "w"] if dynamic else [1, 8, *size]
        self.graph = gs.Graph(opset=13)
        self.graph.inputs = [gs.Variable("x", np.float32, shape)]
        self.quantized_weights = quantized_weights
        self.count = 0

    def _name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def op(self, op, inputs, attrs=None):
        out = gs.Variable(self._name(op.lower() + "_out"), np.float32)
        self.graph.nodes.append(gs.Node(op, self._name(op), attrs or {}, inputs, [out]))
        return out

    def conv(self, x, stride=1, kernel=3):
        weight = gs.Constant(self._name("w"), rng.normal(0, 0.2, (8, 8, kernel, kernel)).astype(np.float32))
        if self.quantized_weights:
            scale = gs.Constant(self._name("ws"), np.full(8, 0.01, np.float32))
            zero = gs.Constant(self._name("wz"), np.zeros(8, np.int8))
            quantized = self.op("QuantizeLinear", [weight, scale, zero], {"axis": 0})
            weight = self.op("DequantizeLinear", [quantized, scale, zero], {"axis": 0})
        pad = kernel // 2
        return self.op("Conv", [x, weight], {"strides": [stride, stride], "pads": [pad] * 4})

    def residual_unit(self, x, convs=3, stride=1):
        """conv-relu x ``convs`` plus a skip (a strided 1x1 conv when the unit downsamples)."""
        y = x
        for i in range(convs):
            y = self.conv(y, stride if i == 0 else 1)
            if i < convs - 1:
                y = self.op("Relu", [y])
        skip = self.conv(x, stride, kernel=1) if stride > 1 else x
        return self.op("Relu", [self.op("Add", [y, skip])])

    def finish(self, y):
        y.dtype = np.float32
        self.graph.outputs = [y]
        return self.graph


def assert_covers_once_in_order(graph, stages):
    names = [name for stage in stages for block in stage.blocks for name in block.nodes]
    assert sorted(names) == sorted(n.name for n in graph.nodes) and len(names) == len(set(names))
    seen: set[str] = set()
    by_name = {n.name: n for n in graph.nodes}
    for name in names:
        producers = {t.inputs[0].name for t in by_name[name].inputs if t.inputs}
        assert producers <= seen, f"{name} runs before its inputs"
        seen.add(name)


def unit_node_names(graph, start_count, end_count):
    return {n.name for n in graph.nodes[start_count:end_count]}


def test_residual_units_are_whole_blocks():
    net = NetBuilder()
    y = net.op("Relu", [net.conv(net.graph.inputs[0])])
    units = []
    for _ in range(3):
        first = len(net.graph.nodes)
        y = net.residual_unit(y)
        units.append({n.name for n in net.graph.nodes[first:]})
    graph = net.finish(y)
    stages = partition(graph, max_layers_per_block=4)
    blocks = [set(b.nodes) for s in stages for b in s.blocks]
    assert len(blocks) == 3
    for unit, block in zip(units, blocks):
        assert unit <= block   # the stem conv (1 layer) joins the first unit, within the budget of 4
    assert_covers_once_in_order(graph, stages)


def test_a_unit_larger_than_the_budget_is_cut_along_its_branch():
    net = NetBuilder()
    graph = net.finish(net.residual_unit(net.graph.inputs[0], convs=6))
    blocks = [b for s in partition(graph, max_layers_per_block=4) for b in s.blocks]
    assert [len(b.weight_layers) for b in blocks] == [4, 2]
    assert blocks[1].inputs == [blocks[0].outputs[0], "x"] or set(blocks[1].inputs) == {"x", blocks[0].outputs[0]}


def _attention_unit(net: NetBuilder, x):
    """Pre-norm self-attention with a skip: 4 weight MatMuls, 2 activation-activation MatMuls."""
    def dense(t):
        return net.op("MatMul", [t, gs.Constant(net._name("wm"), rng.normal(0, 0.2, (8, 8)).astype(np.float32))])
    norm = net.op("LayerNormalization", [x, gs.Constant(net._name("g"), np.ones(8, np.float32)),
                                         gs.Constant(net._name("b"), np.zeros(8, np.float32))], {"axis": -1})
    q, k, v = dense(norm), dense(norm), dense(norm)
    scores = net.op("Softmax", [net.op("MatMul", [q, net.op("Transpose", [k], {"perm": [0, 2, 1]})])], {"axis": -1})
    return net.op("Add", [x, dense(net.op("MatMul", [scores, v]))])


def test_attention_units_are_whole_blocks_and_count_only_weight_matmuls():
    net = NetBuilder()
    net.graph.inputs = [gs.Variable("x", np.float32, [1, 5, 8])]
    first = _attention_unit(net, net.graph.inputs[0])
    boundary = len(net.graph.nodes)
    graph = net.finish(_attention_unit(net, first))
    stages = partition(graph, max_layers_per_block=4)
    blocks = [b for s in stages for b in s.blocks]
    assert [len(b.weight_layers) for b in blocks] == [4, 4]
    assert set(blocks[0].nodes) == {n.name for n in graph.nodes[:boundary]}
    assert blocks[1].inputs == [first.name] and blocks[0].outputs == [first.name]
    assert len(stages) == 1   # a token sequence: stages of up to 4 blocks


@pytest.mark.parametrize("cap, sizes", [(4, [4, 4, 2]), (3, [3, 3, 3, 1]), (1, [1] * 10)])
def test_conv_chain_is_cut_into_units_of_at_most_the_budget(cap, sizes):
    net = NetBuilder(quantized_weights=True)
    y = net.graph.inputs[0]
    for _ in range(10):
        y = net.op("Relu", [net.conv(y)])
    graph = net.finish(y)
    stages = partition(graph, max_layers_per_block=cap)
    assert [len(b.weight_layers) for s in stages for b in s.blocks] == sizes
    assert_covers_once_in_order(graph, stages)
    for block in (b for s in stages for b in s.blocks):
        assert len(block.inputs) == 1 and len(block.outputs) == 1   # weight Q/DQ stay inside, as constants


@pytest.mark.parametrize("dynamic", [False, True], ids=["inferred-shapes", "structural"])
def test_stride_two_conv_starts_a_second_stage(dynamic):
    net = NetBuilder(dynamic=dynamic)
    y = net.graph.inputs[0]
    for stride in (1, 1, 2, 1):
        y = net.op("Relu", [net.conv(y, stride)])
    graph = net.finish(y)
    stages = partition(graph, max_layers_per_block=1)
    assert [len(s.blocks) for s in stages] == [2, 2]
    assert stages[1].inputs == stages[0].outputs


def test_given_shapes_decide_the_stages():
    net = NetBuilder(dynamic=True)
    y = net.graph.inputs[0]
    convs = []
    for _ in range(4):
        y = net.op("Relu", [net.conv(y)])
        convs.append(y.name)
    graph = net.finish(y)
    shapes = {name: (1, 8, 16, 16) if i < 2 else (1, 8, 8, 8) for i, name in enumerate(convs)}
    assert [len(s.blocks) for s in partition(graph, shapes, max_layers_per_block=1)] == [2, 2]


@needs_rapidocr
def test_rec_model_runs_block_by_block_to_the_same_output():
    graph = load_folded("ch_PP-OCRv4_rec_infer.onnx")
    stages = partition(graph)
    assert_covers_once_in_order(graph, stages)
    assert len(stages) >= 3
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (1, 3, 48, 160)).astype(np.float32))
    name = graph.inputs[0].name
    with torch.no_grad():
        expected = GraphModule(graph)({name: x})
        values = {name: x}
        for block in (b for s in stages for b in s.blocks):
            module = GraphModule(graph, block.inputs, block.outputs)
            assert {n.name for n in module.nodes} == set(block.nodes)
            values.update(module({k: values[k] for k in block.inputs}))
    for output, value in expected.items():
        assert relative_error(values[output].numpy(), value.numpy()) <= 1e-4


def _conv_chain(weights_behind_dequantize: bool) -> gs.Graph:
    """Four 3x3 convs with Relu, the third strided; weights plain or int8 behind DequantizeLinear."""
    nodes, initializers, x = [], [], "x"
    for i in range(4):
        w = np.random.default_rng(i).standard_normal((4, 4, 3, 3)).astype(np.float32)
        if weights_behind_dequantize:
            initializers += [onnx.numpy_helper.from_array(w.astype(np.int8), f"w{i}_q"),
                             onnx.numpy_helper.from_array(np.float32(0.1), f"s{i}")]
            nodes.append(onnx.helper.make_node("DequantizeLinear", [f"w{i}_q", f"s{i}"], [f"w{i}"]))
        else:
            initializers.append(onnx.numpy_helper.from_array(w, f"w{i}"))
        stride = 2 if i == 2 else 1
        nodes += [onnx.helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride] * 2),
                  onnx.helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                       [1, 4, 8, 8])],
                                   [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)], initializers)
    return gs.import_onnx(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_weights_behind_dequantize_do_not_hide_the_cuts():
    """Reconstruction partitions the QDQ graph: a weight's DequantizeLinear is no entry into a region,
    so the blocks and stages match those of the float graph (cut at the stride)."""
    shape = lambda graph: [[len(block.weight_layers) for block in stage.blocks]  # noqa: E731
                           for stage in partition(graph, max_layers_per_block=3)]
    assert shape(_conv_chain(True)) == shape(_conv_chain(False)) == [[2], [2]]
