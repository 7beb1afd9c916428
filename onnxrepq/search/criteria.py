"""Choosing quantization ranges: min-max, percentile, and error minimisation (MSE or MAE).

MAE is the default because RepAPQ (arXiv 2402.16121) shows it is less swayed by the rare
outliers that re-parameterized layers carry: MSE spends range on them, MAE spends it on the bulk.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..calibrate.histogram import StreamingHistogram
from .quant_grid import IntGrid, affine_params, fake_quant, symmetric_params
from .weight_pairs import PairLimit, keep_pairs

# Candidate clipping fractions, geometric so that heavy clipping (outliers 50x the bulk) is
# reachable while near-full ranges are still searched finely.
_FRACTIONS = np.unique(np.concatenate([np.geomspace(0.01, 1.0, 80), np.linspace(0.5, 1.0, 51)]))
_WEIGHT_FRACTIONS = np.linspace(0.3, 1.0, 71)
# Under a pair limit (search/weight_pairs.py) a channel may also do better on less of the grid: at
# 2.0 of its reach no pair can pass 128, which is the [-64, 64] grid's error at worst.
_PAIRED_FRACTIONS = np.linspace(0.3, 2.0, 171)
_PAIRED_FRACTIONS_UNCLIPPED = np.linspace(1.0, 2.0, 101)


def _power(method: str) -> float:
    return 1.0 if method == "mae" else 2.0


def activation_range(hist: StreamingHistogram, method: str, grid: IntGrid, percentile: float = 99.99,
                     symmetric: bool = False, cover: Optional[tuple[float, float]] = None) -> tuple[float, float]:
    """The [lo, hi] range (always containing 0) to quantize a tensor with.

    ``cover`` is a range the result must reach (channel_stats.outlier_cover): the error search then
    picks the best of the candidates widened to it, so the other end can still move to suit.
    """
    lo, hi = min(hist.min, 0.0), max(hist.max, 0.0)
    if hi - lo <= 0 or not np.isfinite(lo) or not np.isfinite(hi):
        return 0.0, 1e-8
    if cover is not None:
        cover = (max(min(cover[0], 0.0), lo), min(max(cover[1], 0.0), hi))  # inside what was observed
    if method == "minmax":
        pass
    elif method == "percentile":
        hi = max(hist.percentile(percentile), 0.0) if hist.max > 0 else 0.0
        lo = min(hist.percentile(100.0 - percentile), 0.0) if hist.min < 0 else 0.0
        if cover is not None:
            lo, hi = min(lo, cover[0]), max(hi, cover[1])
    else:
        lo, hi = _search(hist, _power(method), grid, lo, hi, symmetric, cover)
    if symmetric:
        reach = max(-lo, hi)
        return -reach, reach
    return lo, max(hi, lo + 1e-8)


def _search(hist: StreamingHistogram, power: float, grid: IntGrid, lo: float, hi: float, symmetric: bool,
            cover: Optional[tuple[float, float]] = None):
    centers, counts = hist.nonzero()
    best = _refined(_candidates(lo, hi, symmetric), centers, counts, power, grid, symmetric, lo, hi)
    if cover is None or (best[0] <= cover[0] and best[1] >= cover[1]):
        return best  # a bound the unconstrained best already meets changes nothing
    return _refined(_candidates(lo, hi, symmetric), centers, counts, power, grid, symmetric, lo, hi, _widen_to(cover))


def _refined(candidates, centers, counts, power, grid, symmetric, lo, hi, widen=lambda pairs: pairs):
    best = _best(widen(candidates), centers, counts, power, grid, symmetric)
    if not symmetric and lo < 0.0 < hi:
        # Two sided: the coarse lo x hi grid, then a fine one around its best pair.
        best_lo, best_hi = best
        fine = [(best_lo * a, best_hi * b) for a in np.linspace(0.85, 1.15, 13) for b in np.linspace(0.85, 1.15, 13)]
        fine = [(max(l, lo), min(h, hi)) for l, h in fine]
        best = _best(widen(fine + [best]), centers, counts, power, grid, symmetric)
    return best


def _widen_to(cover: tuple[float, float]):
    """Candidates moved out to reach ``cover``, duplicates dropped (every deep clip becomes the cover itself)."""
    def widen(candidates):
        return list(dict.fromkeys((min(lo, cover[0]), max(hi, cover[1])) for lo, hi in candidates))
    return widen


def _candidates(lo: float, hi: float, symmetric: bool) -> list[tuple[float, float]]:
    if symmetric:
        reach = max(-lo, hi)
        candidates = [(-f * reach, f * reach) for f in _FRACTIONS]
    elif lo == 0.0 or hi == 0.0:
        candidates = [(lo * f, hi * f) for f in _FRACTIONS]
    else:
        # Two sided: search the lower and upper fractions on a grid (coarse), then refine upper.
        coarse = _FRACTIONS[::4]
        candidates = [(lo * a, hi * b) for a in coarse for b in coarse]
    return candidates


def _best(candidates, centers, counts, power, grid, symmetric):
    best, best_error = candidates[-1], np.inf
    for lo, hi in candidates:
        scale, zero_point = symmetric_params(max(-lo, hi), grid) if symmetric else affine_params(lo, hi, grid)
        error = float(np.dot(counts, np.abs(centers - fake_quant(centers, scale, zero_point, grid)) ** power))
        if error < best_error:
            best, best_error = (lo, hi), error
    return best


def weight_scales(weight: np.ndarray, axis: int, method: str, grid: IntGrid,
                  pairs: Optional[PairLimit] = None) -> np.ndarray:
    """Per-channel symmetric scales along ``axis``; error-minimising methods clip per channel.

    An all-zero channel (pruned) quantizes to 0 at any step; it gets the median step of the
    layer's other channels, not a vanishing one: its bias is stored at input x weight step, and a
    step of 1e-10 pushed PP-OCRv4 rec's biases past int32 (and underflows a half-precision scale).
    Under ``pairs`` the error is the one after the pair limit, and steps up to twice the full-range
    one are candidates; min-max and percentile then only widen (they never clip a weight).
    """
    moved = np.moveaxis(np.asarray(weight, np.float64), axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    reach = np.abs(rows).max(axis=1)
    live = reach > 0
    reach = np.where(live, reach, 1.0)
    if method in ("minmax", "percentile") and pairs is None:
        # Percentile is an activation idea; weights are few and exact, so their full range is kept.
        return _dead_channels_at_median(reach / grid.qmax, live)
    power = 2.0 if pairs is not None and method in ("minmax", "percentile") else _power(method)
    fractions = _WEIGHT_FRACTIONS
    if pairs is not None:
        rows = pairs.to_pairs(rows)
        fractions = _PAIRED_FRACTIONS_UNCLIPPED if method in ("minmax", "percentile") else _PAIRED_FRACTIONS
    best_scale = reach / grid.qmax
    best_error = np.full(rows.shape[0], np.inf)
    for fraction in fractions:
        scale = (reach * fraction / grid.qmax)[:, None]
        if pairs is None:
            quantized = fake_quant(rows, scale, 0, grid)
        else:
            steps = np.clip(rows / scale, grid.qmin, grid.qmax)
            quantized = keep_pairs(steps, np.rint(steps), pairs.limit) * scale
        error = (np.abs(rows - quantized) ** power).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale[:, 0], best_scale)
    return _dead_channels_at_median(best_scale, live)


def _dead_channels_at_median(scales: np.ndarray, live: np.ndarray) -> np.ndarray:
    fill = float(np.median(scales[live])) if live.any() else 1.0
    return np.where(live, scales, fill).astype(np.float32)
