"""Mixed precision: sensitivities measured in onnxruntime, a greedy search under a budget."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from onnxrepq.api import quantize_with_result
from onnxrepq.cli import main
from onnxrepq.config import QuantConfig
from onnxrepq.errors import UserError
from onnxrepq.search.mixed_precision import LayerChoice, MixedPrecisionConfig, _allocate, _greedy, _toward_uniform
from tests.emit.nets import MobileBlocksNet
from tests.models_for_tests import export_torch, run_ort, sqnr_db, structured_images


def test_greedy_lowers_the_cheapest_error_per_bit_first():
    layers = [LayerChoice("robust", 1000, 0, 8, {8: 0.0, 4: 0.001, 2: 0.01}),
              LayerChoice("fragile", 1000, 0, 8, {8: 0.0, 4: 0.5, 2: 0.9})]
    result = _greedy(layers, MixedPrecisionConfig(budget_size_mb=1000 * 12 / 8 / 1e6, candidates=(8, 4, 2)), 8)
    assert result.bits == {"robust": 4, "fragile": 8} and result.met_budget
    tighter = [LayerChoice(l.node, l.params, l.macs, 8, l.errors) for l in layers]
    result = _greedy(tighter, MixedPrecisionConfig(budget_size_mb=1000 * 8 / 8 / 1e6, candidates=(8, 4, 2)), 8)
    # robust 8 -> 4 -> 2 (0.001 then 0.009 for 2000 bits each), only then fragile 8 -> 4
    assert result.bits == {"robust": 2, "fragile": 4} and result.met_budget


def test_unreachable_budget_is_reported_not_hidden():
    layers = [LayerChoice("a", 10, 0, 8, {8: 0.0, 2: 0.3})]
    result = _greedy(layers, MixedPrecisionConfig(budget_size_mb=1e-9, candidates=(8, 2)), 8)
    assert not result.met_budget and result.bits == {"a": 2}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    calibration = structured_images(16, seed=11)
    return export_torch(MobileBlocksNet(), calibration[:1]), calibration


def _weights_mb(result) -> float:
    return sum(row["weight_count"] * row["weight_bits"] for row in result.layers
               if "weight_bits" in row) / 8 / 1e6


def test_mixed_precision_beats_uniform_at_the_same_size(net):
    model, calibration = net
    uniform = quantize_with_result(model, calibration, QuantConfig(weight_bits=4, fast=True))
    budget = _weights_mb(uniform)
    mixed = quantize_with_result(model, calibration, QuantConfig(
        fast=True, mixed_precision=MixedPrecisionConfig(budget_mean_bits=4.0, samples=8)))
    assert _weights_mb(mixed) <= budget + 1e-9
    assert len({row["weight_bits"] for row in mixed.layers if "weight_bits" in row}) > 1
    held_out = structured_images(8, seed=12)
    name = model.graph.input[0].name
    reference = run_ort(model, {name: held_out})[0]
    sqnr = {label: sqnr_db(reference, run_ort(r.model, {name: held_out})[0]) for label, r in
            (("uniform", uniform), ("mixed", mixed))}
    assert sqnr["mixed"] > sqnr["uniform"] + 1.0, sqnr
    assert any(record.name == "mixed_precision" for record in mixed.passes)


def test_bad_budgets_are_refused():
    with pytest.raises(UserError):
        QuantConfig(mixed_precision=MixedPrecisionConfig(budget_size_mb=-1))
    with pytest.raises(UserError):
        QuantConfig(mixed_precision=MixedPrecisionConfig(budget_mean_bits=4, candidates=(8, 1)))


def test_cli_budget_flags(net, tmp_path):
    model, calibration = net
    import onnx
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", calibration)
    assert main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(tmp_path / "c.npy"), "--budget-bitops", "0.05", "--fast", "--quiet"]) == 0
    assert main(["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "r.onnx"), "--calib",
                 str(tmp_path / "c.npy"), "--budget-size", "-2", "--quiet"]) == 2


def test_allocation_is_the_knapsack_optimum_where_greedy_is_not():
    # "big" loses the same at 3 and 2 bits: the per-bit greedy drops it to 2 and must then push
    # "small" down too; the optimum keeps big at 4 and small at 8
    def layers():
        return [LayerChoice("big", 3000, 0, 8, {8: 0.0, 4: 0.01, 3: 0.20, 2: 0.20}),
                LayerChoice("small", 1000, 0, 8, {8: 0.0, 4: 0.3, 3: 0.5, 2: 0.9})]
    config = MixedPrecisionConfig(budget_size_mb=(3000 * 4 + 1000 * 8) / 8e6, candidates=(8, 4, 3, 2))
    optimum = _allocate(layers(), config, 8)
    assert optimum.bits == {"big": 4, "small": 8} and optimum.met_budget
    errors = {l.node: l.errors[l.bits] for l in optimum.layers}
    greedy = _greedy(layers(), config, 8)
    assert sum(errors.values()) <= sum(l.errors[l.bits] for l in greedy.layers)


def test_a_choice_worse_together_than_uniform_is_not_shipped(net, monkeypatch):
    """Sensitivities add only to first order: where the chosen widths measure worse together than the
    uniform width the budget allows, uniform is kept (here the allocation is forced to be bad)."""
    from onnxrepq.search import mixed_precision

    allocate = mixed_precision._allocate

    def lowest_everywhere(layers, config, activation_bits):
        result = allocate(layers, config, activation_bits)
        for layer in result.layers:
            layer.bits = min(config.candidates)
        return result
    monkeypatch.setattr(mixed_precision, "_allocate", lowest_everywhere)
    model, calibration = net
    result = quantize_with_result(model, calibration, QuantConfig(
        fast=True, mixed_precision=MixedPrecisionConfig(budget_mean_bits=4.0, samples=8)))
    assert {row["weight_bits"] for row in result.layers if "weight_bits" in row} == {4}
    notes = next(record.notes for record in result.passes if record.name == "mixed_precision")
    assert "uniform 4-bit kept" in notes[-1]
    joint, uniform = (float(v) for v in re.findall(r"([\d.e+-]+) with", notes[-1]))
    assert joint > uniform > 0


def test_a_better_choice_is_kept_and_its_errors_reported(net):
    model, calibration = net
    result = quantize_with_result(model, calibration, QuantConfig(
        fast=True, mixed_precision=MixedPrecisionConfig(budget_mean_bits=4.0, samples=8)))
    notes = next(record.notes for record in result.passes if record.name == "mixed_precision")
    joint, uniform = (float(v) for v in re.findall(r"([\d.e+-]+) with", notes[-1]))
    assert joint < uniform and "kept" not in notes[-1]


def test_a_pull_toward_uniform_finds_the_choice_that_holds_together():
    """Errors that compound (every 2-bit layer costs more beside another): the knapsack on the alone
    errors takes both robust layers to 2 bits and measures worse than uniform 4; one pull strength
    keeps one of them at 4 and measures better than both."""
    def layers():
        return [LayerChoice("a", 1000, 0, 8, {8: 0.0, 6: 0.01, 4: 0.05, 2: 0.06}),
                LayerChoice("b", 1000, 0, 8, {8: 0.0, 6: 0.01, 4: 0.05, 2: 0.09}),
                LayerChoice("c", 1000, 0, 8, {8: 0.0, 6: 0.005, 4: 0.1, 2: 0.5}),
                LayerChoice("d", 1000, 0, 8, {8: 0.0, 6: 0.02, 4: 0.1, 2: 0.5})]

    def measure(widths):
        alone = sum(layer.errors[bits] for layer, bits in zip(layers(), widths))
        return alone + 0.05 * sum(bits == 2 for bits in widths) ** 2

    config = MixedPrecisionConfig(budget_mean_bits=4.0, budget_size_mb=4000 * 4 / 8e6, candidates=(8, 6, 4, 2),
                                  uniform_pulls=(0.1, 0.2, 1.0))
    knapsack = [layer.bits for layer in _allocate(layers(), config, 8).layers]
    assert knapsack == [2, 2, 6, 6] and measure(knapsack) > measure([4] * 4)
    widths, error, pull = _toward_uniform(layers(), config, 8, 4, measure)
    assert (widths, pull) == ([2, 4, 6, 4], 0.2) and error == pytest.approx(measure(widths))
    assert error < measure([4] * 4) < measure(knapsack)
