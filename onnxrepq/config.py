"""Typed, frozen configuration: one definition per option, shared by the CLI and the API.

A recipe file (TOML/YAML) loads into these dataclasses field for field; the CLI builds one and
calls the API. There are no hidden defaults elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .errors import UserError

ScaleSearch = Literal["mae", "mse", "minmax", "percentile"]
Target = Literal["ort-cpu", "tensorrt"]

SCALE_SEARCHES: tuple[str, ...] = ("mae", "mse", "minmax", "percentile")
TARGETS: tuple[str, ...] = ("ort-cpu", "tensorrt")


@dataclass(frozen=True)
class CalibrationConfig:
    max_samples: int = 256          # samples beyond this are not read
    histogram_bins: int = 2048
    # Elements per tensor and sample that feed the histogram; min/max always see every element.
    sample_elements: int = 1 << 18


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 8
    activation_bits: int = 8
    # Measured on PP-OCRv4 rec (BENCHMARKS.md): MSE ranges for activations and MAE for weights
    # beat every other pairing; MAE on a single activation tensor clips the tails that deep
    # layers still need (0.8 dB output SQNR against 11.3 dB).
    scale_search: ScaleSearch = "mse"
    weight_scale_search: ScaleSearch = "mae"
    percentile: float = 99.99
    target: Target = "ort-cpu"
    seed: int = 0
    fuse_branches: bool = True
    # Op types or node names kept in float whatever the planner would do.
    keep_float: tuple[str, ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise UserError(f"{name.replace('_', ' ')} must be an integer from 2 to 8, got {bits!r}")
        if self.activation_bits != 8:
            # Below 8 bits activations need an integer Clip after each QuantizeLinear to stay on
            # the narrow grid; until the emitter writes it, a narrow grid would be silently wrong.
            raise UserError("activation bits other than 8 are not supported yet (weights go down to 2)")
        for name in ("scale_search", "weight_scale_search"):
            if getattr(self, name) not in SCALE_SEARCHES:
                raise UserError(f"unknown {name.replace('_', '-')} {getattr(self, name)!r};"
                                f" choose one of {', '.join(SCALE_SEARCHES)}")
        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.calibration.max_samples < 1:
            raise UserError("calibration max samples must be at least 1")

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)


def config_fields() -> list[str]:
    return [f.name for f in fields(QuantConfig)]
