"""8-bit weights whose adjacent pairs stay inside int16, so the whole 8-bit grid stays usable.

onnxruntime's AVX2 u8 x s8 kernels (x86 without VNNI) add two adjacent products of the reduction
axis in int16 (``vpmaddubsw``): 255 * (w[2m] + w[2m+1]) must fit in 32767, and it does unless the
two weights have the same sign and |w[2m]| + |w[2m+1]| > 128. Holding every weight to [-64, 64]
guarantees that at the cost of a bit everywhere; holding only the pairs costs almost nothing, as
few pairs in a layer reach past the half-range together (PP-OCRv4 rec, 1.3M pairs: weight error
37.4 dB with the pair limit and a scale search that sees it, 37.9 dB unlimited, 32.4 dB at
[-64, 64]). The model outputs did not follow on the models measured (BENCHMARKS.md, session 11:
activations, not weights, set their error), so it is ``--weight-range paired``, not the default.

The reduction axis is laid out as onnxruntime reads it (measured, tests/emit/test_weight_pairs.py):
a Conv's per-group input channels fastest within each kernel tap ((kh, kw, c), the NHWC im2col
order), a MatMul's or Gemm's K as stored. Depthwise convs run in a kernel that sums in int32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class PairLimit:
    """``limit``: the most |a| + |b| a same-sign pair may reach; ``order``: columns of a weight's
    channel rows (``moveaxis(weight, axis, 0).reshape(channels, -1)``) in the kernel's reduction
    order, or None where they already are."""

    limit: int
    order: Optional[np.ndarray] = None

    def to_pairs(self, rows: np.ndarray) -> np.ndarray:
        ordered = rows if self.order is None else rows[:, self.order]
        return ordered if ordered.shape[1] % 2 == 0 else np.pad(ordered, ((0, 0), (0, 1)))

    def from_pairs(self, paired: np.ndarray, columns: int) -> np.ndarray:
        paired = paired[:, :columns]
        if self.order is None:
            return paired
        rows = np.empty_like(paired)
        rows[:, self.order] = paired
        return rows


def conv_reduction_order(weight_shape: tuple[int, ...]) -> np.ndarray:
    """Columns of a Conv weight's rows ((c, kh, kw), as stored) in (kh, kw, c) order."""
    channels, taps = int(weight_shape[1]), int(np.prod(weight_shape[2:], dtype=np.int64))
    return np.arange(channels * taps).reshape(channels, taps).T.reshape(-1)


def keep_pairs(targets: np.ndarray, integers: np.ndarray, limit: int) -> np.ndarray:
    """``integers`` (rows of the reduction axis, even length) with every same-sign pair (2m, 2m+1)
    over ``limit`` moved onto it, each pair split as close to its float ``targets`` (in steps, within
    the grid) as the limit allows: the least squared error for the pair."""
    over = pairs_over(integers, limit)
    if not over.any():
        return integers
    target_first = np.abs(targets[:, 0::2])
    target_second = np.abs(targets[:, 1::2])
    # minimise (t1 - a)^2 + (t2 - b)^2 on a + b = limit: a = (t1 - t2 + limit) / 2
    share = np.clip(np.rint((target_first - target_second + limit) / 2), 1, limit - 1)
    first, second = integers[:, 0::2], integers[:, 1::2]
    sign = np.sign(first)
    result = integers.copy()
    result[:, 0::2] = np.where(over, sign * share, first)
    result[:, 1::2] = np.where(over, sign * (limit - share), second)
    return result


def pairs_over(integers: np.ndarray, limit: int) -> np.ndarray:
    """Per pair (2m, 2m+1) of each row: same sign and |a| + |b| past ``limit``."""
    first, second = integers[:, 0::2], integers[:, 1::2]
    return (first * second > 0) & (np.abs(first) + np.abs(second) > limit)


def pairs_within(integers: np.ndarray, limit: int) -> bool:
    return not pairs_over(integers, limit).any()
