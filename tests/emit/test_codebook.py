"""Clustered weights: k-means codebooks (search/clustering.py) emitted as indices + codebook (emit/codebook.py).

The claims checked: the Gather chain decodes in onnxruntime to exactly the numpy-decoded weight, the
optimized graph still runs int8 kernels with the chain folded away, the clustering never loses to
uniform b-bit weights on squared error, and the recipe refuses what it cannot do.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxrepq
from onnxrepq.api import quantize_with_result
from onnxrepq.cli import main
from onnxrepq.config import NodeOverride, QuantConfig, load_recipe
from onnxrepq.emit.codebook import EmitCodebookWeights
from onnxrepq.emit.coverage import kernel_coverage, optimized_model
from onnxrepq.errors import UserError
from onnxrepq.search.clustering import cluster_weight, nominal_bits
from onnxrepq.search.criteria import weight_scales
from onnxrepq.search.quant_grid import IntGrid, fake_quant, weight_grid
from tests.models_for_tests import apply_passes, make_model, op_types, relative_error, run_ort, structured_images

REDUCED = IntGrid(-64, 64, np.int8)   # the 8-bit grid on x86 without VNNI (emit/saturation.py)


def heavy_tailed(*shape, seed: int) -> np.ndarray:
    """Student-t weights (3 degrees of freedom): the outliers that make a uniform grid waste levels."""
    return (np.random.default_rng(seed).standard_t(3, shape) * 0.1).astype(np.float32)


def conv_gemm_model(conv1, conv2, dense, weight_nodes=(), extra_initializers=None) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Relu -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> Gemm (transB = 0).

    ``weight_nodes`` are put first, for weights that a graph computes (named w1, w2, w3)."""
    nodes = [*weight_nodes,
             helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], "conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], "dense")]
    initializers = {"w1": conv1, "b1": np.full(conv1.shape[0], 0.1, np.float32),
                    "w2": conv2, "b2": np.zeros(conv2.shape[0], np.float32),
                    "w3": dense, "b3": np.zeros(dense.shape[1], np.float32), **(extra_initializers or {})}
    computed = {output for node in weight_nodes for output in node.output}
    initializers = {name: value for name, value in initializers.items() if name not in computed}
    return make_model(nodes, {"x": ["batch", conv1.shape[1], 8, 8]}, {"y": ["batch", dense.shape[1]]}, initializers)


def float_weights() -> dict[str, tuple[np.ndarray, int]]:
    """Weight name -> (values, output-channel axis)."""
    return {"w1": (heavy_tailed(8, 3, 3, 3, seed=1), 0), "w2": (heavy_tailed(16, 8, 3, 3, seed=2), 0),
            "w3": (heavy_tailed(16, 5, seed=3), 1)}


def codebook(weight: np.ndarray, axis: int, bits: int = 4, container: IntGrid = REDUCED):
    grid = weight_grid(bits)
    return cluster_weight(weight, axis, weight_scales(weight, axis, "mse", grid), grid, bits, container)


def dequantized_weight_model(books: dict) -> tuple[onnx.ModelProto, dict]:
    """The model with each weight computed as DequantizeLinear(int8 codebook weight): the form
    FoldWeightQuantizers leaves, which EmitCodebookWeights rewrites. Also the codebooks by layer."""
    nodes, initializers = [], {}
    for name, book in books.items():
        moved = [book.shape[book.axis]] + [d for i, d in enumerate(book.shape) if i != book.axis]
        initializers |= {f"{name}_int8": np.moveaxis(book.integers.reshape(moved), 0, book.axis),
                         f"{name}_scale": book.scale, f"{name}_zero_point": np.zeros_like(book.levels[:, 0])}
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                      [name], f"{name}_DequantizeLinear", axis=book.axis))
    model = conv_gemm_model(*(np.zeros(book.shape, np.float32) for book in books.values()), weight_nodes=nodes,
                            extra_initializers=initializers)
    return model, dict(zip(("conv1", "conv2", "dense"), books.values()))


def test_emitted_chain_decodes_to_the_numpy_codebook_weight_in_onnxruntime():
    books = {name: codebook(weight, axis) for name, (weight, axis) in float_weights().items()}
    dequantized, by_layer = dequantized_weight_model(books)
    emitted, records = apply_passes(dequantized, [EmitCodebookWeights(by_layer)])
    onnx.checker.check_model(emitted, full_check=True)
    assert records[0].notes == ["3 weights stored as codebook indices"]
    assert op_types(emitted).count("GatherElements") == 3 and op_types(emitted).count("Transpose") == 1
    stored = {i.name: i.data_type for i in emitted.graph.initializer}
    assert {stored[f"{layer}_weight_codebook_indices"] for layer in by_layer} == {onnx.TensorProto.UINT8}

    decoded = conv_gemm_model(*(book.decode() for book in books.values()))
    feeds = {"x": structured_images(4, seed=5, channels=3, size=8)}
    assert relative_error(run_ort(decoded, feeds, False)[0], run_ort(emitted, feeds, False)[0]) < 1e-5
    # Optimized, onnxruntime turns DequantizeLinear(int8) -> Gemm on a float input into MatMulNBits,
    # which rounds the activation too, so there the reference is the plain int8 weight: it must match
    # bit for bit, as the chain is folded before any fusion sees it.
    for optimize in (False, True):
        assert np.array_equal(run_ort(dequantized, feeds, optimize)[0], run_ort(emitted, feeds, optimize)[0])


def test_emission_refuses_a_weight_that_is_not_the_codebook():
    books = {name: codebook(w, a) for name, (w, a) in float_weights().items()}
    dequantized, by_layer = dequantized_weight_model(books)
    by_layer["conv1"] = codebook(heavy_tailed(8, 3, 3, 3, seed=9), 0)
    with pytest.raises(RuntimeError, match="conv1: the folded weight is not the codebook"):
        apply_passes(dequantized, [EmitCodebookWeights(by_layer)])


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("container", [REDUCED, weight_grid(8)])
def test_clustered_weights_have_lower_squared_error_than_uniform(bits, container):
    grid = weight_grid(bits)
    total_uniform = total_clustered = 0.0
    for name, (weight, axis) in float_weights().items():
        scale = weight_scales(weight, axis, "mse", grid)
        shape = [1] * weight.ndim
        shape[axis] = -1
        others = tuple(i for i in range(weight.ndim) if i != axis)
        uniform = ((weight - fake_quant(weight, scale.reshape(shape), 0, grid)) ** 2).sum(axis=others)
        book = cluster_weight(weight, axis, scale, grid, bits, container)
        clustered = ((weight - book.decode()) ** 2).sum(axis=others)
        assert book.levels.shape == (weight.shape[axis], 2 ** bits) and book.indices.max() < 2 ** bits
        assert np.abs(book.levels).max() <= container.qmax
        assert np.all(clustered <= uniform * (1 + 1e-6)), name   # channel by channel
        total_uniform, total_clustered = total_uniform + uniform.sum(), total_clustered + clustered.sum()
        again = cluster_weight(weight, axis, scale, grid, bits, container)
        assert np.array_equal(again.indices, book.indices) and np.array_equal(again.levels, book.levels)
    # On heavy tails the non-uniform levels are worth far more than rounding noise.
    assert total_clustered < 0.5 * total_uniform, (total_clustered, total_uniform)


def test_weights_already_on_a_uniform_grid_stay_exact():
    """Where uniform b-bit weights are exact, so are the clustered ones: the candidate started from the
    uniform levels keeps them (the free one alone would not: 64 / 7 is no integer step)."""
    steps = np.random.default_rng(4).uniform(0.01, 0.1, 12).astype(np.float32)
    levels = np.random.default_rng(5).integers(-7, 8, (12, 40))
    levels[:, :2] = [-7, 7]   # every channel reaches both ends, so the uniform scale is exactly its step
    weight = (levels * steps[:, None]).astype(np.float32)
    grid = weight_grid(4)
    book = cluster_weight(weight, 0, weight_scales(weight, 0, "minmax", grid), grid, 4, REDUCED)
    assert np.abs(book.decode() - weight).max() <= 1e-6 * np.abs(weight).max()


def test_nominal_size_counts_indices_scales_and_codebooks():
    assert nominal_bits(1000, 10, 4) == 1000 * 4 + 10 * 32
    assert nominal_bits(1000, 10, 4, codebook_entries=16) == 1000 * 4 + 10 * (32 + 16 * 8)


@pytest.fixture(scope="module")
def model_and_data():
    weights = float_weights()
    return conv_gemm_model(*(w for w, _ in weights.values())), structured_images(16, seed=7, channels=3, size=8)


def test_pipeline_keeps_int8_kernels_and_folds_the_codebook_away(model_and_data):
    model, data = model_and_data
    eight_bit = onnxrepq.quantize(model, data, QuantConfig(fast=True))
    result = quantize_with_result(model, data, QuantConfig(fast=True, weight_bits=4, clustered_weights=True))
    onnx.checker.check_model(result.model, full_check=True)
    assert op_types(result.model).count("GatherElements") == 3
    optimized = op_types(optimized_model(result.model))
    assert "GatherElements" not in optimized and "Cast" not in optimized
    coverage = kernel_coverage(result.model)
    assert coverage.integer_kernels == kernel_coverage(eight_bit).integer_kernels == {"QLinearConv": 2, "QGemm": 1}
    rows = [row for row in result.layers if "weight_bits" in row]
    assert len(rows) == 3 and all(row["codebook_entries"] == 16 and row["weight_bits"] == 4 and
                                  row["weight_storage"].startswith("codebook 16 x int8") for row in rows)


def test_eight_bit_layers_stay_plain_int8(model_and_data):
    """2^8 entries are every level of the int8 grid: a codebook would only add size."""
    model, data = model_and_data
    config = QuantConfig(fast=True, weight_bits=3, clustered_weights=True,
                         overrides=(NodeOverride("Gemm", weight_bits=8),))
    result = quantize_with_result(model, data, config)
    assert op_types(result.model).count("GatherElements") == 2
    assert [row.get("codebook_entries") for row in result.layers if "weight_bits" in row] == [8, 8, None]


def test_config_refuses_clustering_with_reconstruction():
    with pytest.raises(UserError, match="add --fast"):
        QuantConfig(fast=False, clustered_weights=True)
    with pytest.raises(UserError, match="ort-cpu"):
        QuantConfig(fast=True, clustered_weights=True, target="tensorrt")
    assert QuantConfig(fast=True, clustered_weights=True).clustered_weights


def test_recipe_key_loads(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("fast = true\nweight_bits = 4\nclustered_weights = true\n")
    assert load_recipe(recipe) == QuantConfig(fast=True, weight_bits=4, clustered_weights=True)


def test_cli_flag(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    onnx.save(model, tmp_path / "model.onnx")
    np.save(tmp_path / "calib.npy", data)
    common = ["quantize", str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npy"),
              "--wbits", "4", "--clustered-weights", "--quiet", "-o"]
    assert main(common + [str(tmp_path / "refused.onnx"), "--reconstruct"]) == 2
    assert "add --fast" in capsys.readouterr().err and not (tmp_path / "refused.onnx").exists()
    assert main(common + [str(tmp_path / "clustered.onnx"), "--fast"]) == 0
    assert op_types(onnx.load(tmp_path / "clustered.onnx")).count("GatherElements") == 3
