"""Loading and saving: external data kept when the input had it, written atomically under
content-named data files; the >2 GiB code paths exercised on a small model by lowering the limit;
graph outputs that carry only an element type."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import onnxrepq.graph.external as external
from onnxrepq.cli import main
from onnxrepq.graph.io import check_model, has_external_data, load_model, save_model_atomic
from tests.models_for_tests import conv_bn_model, make_model, run_ort, structured_images, weights


def run_path(path, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def external_input(tmp_path):
    """conv_bn_model with its 64 x 3 x 3 x 3 conv weight (6.9 kB) beside the graph in weights.bin."""
    model = conv_bn_model(channels=64, size=16)
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=1024)
    np.save(tmp_path / "calib.npy", structured_images(8, seed=5))
    return tmp_path


def snapshot(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_quantize_keeps_external_data_beside_the_output(external_input):
    folder = external_input
    before = snapshot(folder)
    assert has_external_data(folder / "model.onnx")
    code = main(["quantize", str(folder / "model.onnx"), "-o", str(folder / "q.onnx"), "--calib",
                 str(folder / "calib.npy"), "--quiet"])
    assert code == 0
    after = snapshot(folder)
    assert {name: after[name] for name in before} == before  # the input's graph and weights untouched
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and new[0] == "q.onnx" and new[1].startswith("q.onnx.") and new[1].endswith(".data")
    graph_only = onnx.load(str(folder / "q.onnx"), load_external_data=False)
    assert external.external_locations(graph_only) == {new[1]}
    assert not any(name.startswith(".") for name in after)  # no temporaries left
    assert len(after[new[1]]) >= 64 * 27  # the int8 conv weight
    onnx.checker.check_model(str(folder / "q.onnx"))
    feeds = {"x": structured_images(2, seed=6)}
    (reference,) = run_ort(load_model(folder / "model.onnx"), feeds)
    (quantized,) = run_path(folder / "q.onnx", feeds)
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()


def test_an_inline_input_gives_an_inline_output(tmp_path):
    onnx.save(conv_bn_model(channels=32, size=16), str(tmp_path / "model.onnx"))
    np.save(tmp_path / "calib.npy", structured_images(8, seed=5))
    assert main(["quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "calib.npy"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "model.onnx", "q.onnx"]


def test_no_data_file_when_no_tensor_is_large_enough(tmp_path):
    save_model_atomic(conv_bn_model(channels=4), tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_saving_again_replaces_the_data_file_and_leaves_others_alone(tmp_path):
    first, second = conv_bn_model(channels=32, size=16), conv_bn_model(channels=32, size=16)  # random weights differ
    (tmp_path / "q.onnx.foreign.bin").write_bytes(b"someone else's")
    save_model_atomic(first, tmp_path / "q.onnx", external_data=True)
    (old,) = tmp_path.glob("q.onnx.*.data")
    save_model_atomic(second, tmp_path / "q.onnx", external_data=True)
    (new,) = tmp_path.glob("q.onnx.*.data")
    assert new != old and (tmp_path / "q.onnx.foreign.bin").exists()
    feeds = {"x": structured_images(2, seed=7)}
    np.testing.assert_array_equal(run_path(tmp_path / "q.onnx", feeds)[0], run_ort(second, feeds)[0])


def test_saving_with_external_data_leaves_the_proto_as_it_was():
    """onnx.save_model(save_as_external_data=True) empties the tensors it moves out; ours must not."""
    model = conv_bn_model(channels=32)
    before = model.SerializeToString(deterministic=True)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        save_model_atomic(model, Path(folder) / "m.onnx", external_data=True)
    assert model.SerializeToString(deterministic=True) == before


def test_weight_bytes_come_from_dims_not_serialisation():
    model = conv_bn_model(channels=8)
    assert external.weight_bytes(model) == 4 * (8 * 3 * 3 * 3 + 5 * 8)


def test_the_over_2gb_path_end_to_end_on_a_small_model(tmp_path, monkeypatch):
    """With the limit lowered every model takes the paths a >2 GiB model takes: checker on a copy
    without weight bytes, onnxruntime sessions read from files, external data forced on save."""
    monkeypatch.setattr(external, "PROTOBUF_LIMIT", 1000)
    model = conv_bn_model(channels=64, size=16)  # its int8 weight (1.7 kB) goes to the data file
    assert external.exceeds_protobuf(model)
    check_model(model)
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.save(tmp_path / "calib.npy", structured_images(8, seed=5))
    assert main(["quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "calib.npy"), "--quiet"]) == 0
    assert len(list(tmp_path.glob("q.onnx.*.data"))) == 1
    feeds = {"x": structured_images(2, seed=6)}
    (reference,) = run_ort(model, feeds)
    (quantized,) = run_path(tmp_path / "q.onnx", feeds)
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()


def test_outputs_with_only_an_element_type_are_quantized(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, {"x": ["n", 3, 16, 16]}, ["y"], {"w": weights(16, 3, 3, 3), "b": weights(16)})
    assert not model.graph.output[0].type.tensor_type.HasField("shape")
    onnx.save(model, str(tmp_path / "model.onnx"))
    np.save(tmp_path / "calib.npy", structured_images(8, seed=5))
    assert main(["quantize", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "calib.npy"), "--quiet"]) == 0
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    assert [d.dim_param or d.dim_value for d in quantized.graph.output[0].type.tensor_type.shape.dim] == \
        ["n", 16, 16, 16]
    feeds = {"x": structured_images(2, seed=6)}
    assert run_ort(quantized, feeds)[0].shape == (2, 16, 16, 16)


def test_fuse_keeps_external_data_too(external_input):
    folder = external_input
    assert main(["fuse", str(folder / "model.onnx"), "-o", str(folder / "f.onnx")]) == 0
    assert len(list(folder.glob("f.onnx.*.data"))) == 1
    feeds = {"x": structured_images(2, seed=6)}
    np.testing.assert_allclose(run_path(folder / "f.onnx", feeds)[0],
                               run_ort(load_model(folder / "model.onnx"), feeds)[0], rtol=1e-4, atol=1e-4)
