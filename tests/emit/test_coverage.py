"""kernel_coverage() and `onnxrepq inspect --runtime` on a hand-built QDQ conv."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxrepq.cli import main
from onnxrepq.emit.coverage import kernel_coverage
from tests.emit.test_ort_cpu_rules import activation_params, qdq, weight_dq
from tests.models_for_tests import make_model


def conv_hardsigmoid_conv() -> onnx.ModelProto:
    """Q/DQ -> Conv -> Q/DQ -> HardSigmoid -> Q/DQ -> Conv -> y: one float island, one float conv."""
    rng = np.random.default_rng(1)
    first_inits, first = weight_dq("w1", rng.standard_normal((8, 4, 3, 3)).astype(np.float32), 0)
    second_inits, second = weight_dq("w2", rng.standard_normal((4, 8, 1, 1)).astype(np.float32), 0)
    nodes = [*qdq("x", "xd"), *first, helper.make_node("Conv", ["xd", "w1"], ["c1"], pads=[1] * 4), *qdq("c1", "c1d"),
             helper.make_node("HardSigmoid", ["c1d"], ["gate"]), *qdq("gate", "gated"),
             *second, helper.make_node("Conv", ["gated", "w2"], ["y"])]
    return make_model(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, activation_params() | first_inits | second_inits)


def test_kernel_coverage_counts_kernels_and_islands():
    coverage = kernel_coverage(conv_hardsigmoid_conv())
    assert coverage.integer_kernels == {"QLinearConv": 1}
    assert sum(coverage.float_compute.values()) == 1          # the last conv writes a float graph output
    assert coverage.float_islands == {"HardSigmoid": 1}
    assert coverage.coverage == 0.5 and coverage.quantize_nodes >= 1 and coverage.dequantize_nodes >= 1


def test_inspect_runtime_prints_the_coverage(tmp_path, capsys):
    path = tmp_path / "qdq.onnx"
    onnx.save(conv_hardsigmoid_conv(), str(path))
    assert main(["inspect", "--runtime", str(path)]) == 0
    out = capsys.readouterr().out
    assert "integer kernels: QLinearConv 1" in out and "float islands: HardSigmoid 1" in out
