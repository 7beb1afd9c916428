"""report.json: what quantize() did to each layer and how far each layer's output moved from float."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import QuantConfig
from .layers import first_samples, int8_weight_fraction, layer_sqnr, model_comparison

REPORT_SAMPLES = 16


def build_report(result, config: QuantConfig, samples: int = REPORT_SAMPLES) -> dict[str, Any]:
    """The report as plain data; ``result`` is a QuantizeResult (float model and calibration data kept)."""
    started = time.perf_counter()
    feeds = first_samples(result.calibration_data, samples)
    layers = [dict(row) for row in result.layers]
    errors = layer_sqnr(result.float_model, result.model, feeds, [row["output"] for row in layers])
    for row in layers:
        row["sqnr_db"] = errors.get(row["output"])
    comparison = model_comparison(result.float_model, result.model, feeds)
    quantized = {row["name"] for row in layers if "weight_bits" in row}
    report = {
        "tool": "onnxrepq", "version": __version__,
        "recipe": asdict(config),
        "calibration": {"samples": result.calibration_samples, "sha256": result.calibration_hash},
        "model": {
            "samples": comparison.samples,
            "outputs": [asdict(output) for output in comparison.outputs],
            "min_sqnr_db": comparison.min_sqnr_db,
            "int8_weight_fraction": int8_weight_fraction(result.float_model, quantized),
            "quantized_layers": len(quantized), "float_layers": len(layers) - len(quantized),
        },
        "layers": layers,
        "passes": [asdict(record) for record in result.passes],
        "timings": dict(result.timings),
    }
    blocks = getattr(result, "blocks", None)
    if blocks:
        report["blocks"] = [asdict(block) for block in blocks]
    report["timings"]["report"] = time.perf_counter() - started
    return _finite(report)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    """Strict JSON: infinities and NaN (an exact output, an empty loss) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
