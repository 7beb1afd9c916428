"""The zoo's training-form exports fuse, at graph level, to exactly their torch deploy forms."""
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxrepq
from tests.models_for_tests import relative_error, run_ort

ZOO = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "models").glob("*/model.onnx"))


@pytest.mark.parametrize("folder", ZOO, ids=[f.name for f in ZOO])
def test_zoo_model_fuses_to_its_deploy_form(folder):
    fused = onnxrepq.fuse(str(folder / "model.onnx"))
    deploy = onnx.load(str(folder / "deploy.onnx"))
    fused_ops, deploy_ops = Counter(n.op_type for n in fused.graph.node), Counter(n.op_type for n in deploy.graph.node)
    assert fused_ops["BatchNormalization"] == 0
    assert fused_ops["Conv"] == deploy_ops["Conv"]
    assert fused_ops["Add"] == deploy_ops["Add"]
    images = np.load(folder / "calib.npy")[:16]
    reference = run_ort(onnx.load(str(folder / "model.onnx")), {"input": images})[0]
    assert relative_error(reference, run_ort(fused, {"input": images})[0]) < 1e-4
