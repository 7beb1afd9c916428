"""The integer grids and the arithmetic of QuantizeLinear/DequantizeLinear, in numpy.

Rounding is half-to-even and values saturate, as onnxruntime's QuantizeLinear does, so an error
computed here is the error the exported graph will have.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IntGrid:
    """An integer range with its storage type: uint8 [0, 255], int8 [-127, 127], 6-bit in int8..."""

    qmin: int
    qmax: int
    dtype: type

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


def activation_grid(bits: int, signed: bool) -> IntGrid:
    if signed:
        return IntGrid(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1, np.int8)
    return IntGrid(0, 2 ** bits - 1, np.uint8)


def weight_grid(bits: int) -> IntGrid:
    # Symmetric and narrow ([-127, 127] at 8 bits): zero point 0 and no -128, which keeps
    # u8 x s8 dot products clear of the VNNI/AVX2 saturation case.
    return IntGrid(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1, np.int8)


def affine_params(lo: float, hi: float, grid: IntGrid) -> tuple[float, int]:
    """Scale and zero point mapping [lo, hi] (which must contain 0) onto the grid."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return 1.0, grid.qmin if grid.qmin >= 0 else 0
    scale = (hi - lo) / grid.levels
    zero_point = int(np.clip(np.round(grid.qmin - lo / scale), grid.qmin, grid.qmax))
    return float(scale), zero_point


def symmetric_params(reach: float, grid: IntGrid) -> tuple[float, int]:
    reach = max(float(reach), 1e-12)
    return reach / grid.qmax, 0


def fake_quant(x: np.ndarray, scale, zero_point, grid: IntGrid) -> np.ndarray:
    q = np.clip(np.rint(x / scale) + zero_point, grid.qmin, grid.qmax)
    return (q - zero_point) * scale


def quantize(x: np.ndarray, scale, zero_point, grid: IntGrid) -> np.ndarray:
    q = np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero_point, grid.qmin, grid.qmax)
    return q.astype(grid.dtype)
