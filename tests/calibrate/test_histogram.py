"""StreamingHistogram: counts are conserved, extremes exact, and doubling the range moves no mass."""
from __future__ import annotations

import numpy as np
import pytest

from onnxrepq.calibrate.histogram import StreamingHistogram
from onnxrepq.search.criteria import activation_range
from onnxrepq.search.quant_grid import activation_grid

rng = np.random.default_rng(2)
BIG = 1 << 22  # no subsampling in these tests


def test_counts_sum_and_exact_extremes():
    hist = StreamingHistogram(bins=256, sample_elements=BIG)
    chunks = [rng.standard_normal((4, 100)).astype(np.float32) * 0.3 for _ in range(5)]
    for chunk in chunks:
        hist.update(chunk)
    values = np.concatenate([c.ravel() for c in chunks])
    assert hist.counts.sum() == values.size
    assert hist.min == float(values.min()) and hist.max == float(values.max())
    assert hist.samples == 5
    reach = np.abs(values).max()
    assert reach <= hist.edge < 2 * reach and np.log2(hist.edge) == round(np.log2(hist.edge))


def test_range_doubling_keeps_counts_and_percentiles():
    hist = StreamingHistogram(bins=2048, sample_elements=BIG)
    # growing scales force several doublings after the first chunks are binned
    chunks = [rng.standard_normal(50_000).astype(np.float32) * scale for scale in (0.05, 0.5, 2.0, 9.0)]
    edges = []
    for chunk in chunks:
        hist.update(chunk)
        edges.append(hist.edge)
    assert edges[-1] / edges[0] >= 64  # at least six doublings happened
    values = np.concatenate(chunks)
    assert hist.counts.sum() == values.size
    width = 2 * hist.edge / hist.bins
    for q in (1, 10, 25, 50, 75, 90, 99):
        assert abs(hist.percentile(q) - np.percentile(values, q)) <= width
    # the mass of the first, narrow chunk stays near zero: the central bins hold at least its count
    centers = hist.centers
    near_zero = hist.counts[np.abs(centers) <= 0.05 * 4 + width].sum()
    assert near_zero >= 0.999 * chunks[0].size


def test_subsampling_large_tensors_keeps_extremes():
    hist = StreamingHistogram(bins=256, sample_elements=1000)
    values = rng.standard_normal(100_000).astype(np.float32)
    hist.update(values)
    assert hist.counts.sum() == 1000
    assert hist.min == float(values.min()) and hist.max == float(values.max())
    assert abs(hist.percentile(50)) < 0.15


def test_all_zero_tensors():
    hist = StreamingHistogram(bins=64, sample_elements=BIG)
    hist.update(np.zeros((3, 5), np.float32))
    hist.update(np.zeros(7, np.float32))
    assert hist.edge == 0.0 and hist.counts.sum() == 22
    assert hist.min == 0.0 and hist.max == 0.0
    assert hist.percentile(50) == 0.0
    assert activation_range(hist, "mse", activation_grid(8, False)) == (0.0, 1e-8)
    hist.update(np.array([0.5, -1.5], np.float32))
    assert hist.counts.sum() == 24 and hist.edge == 2.0
    assert hist.percentile(50) == pytest.approx(0.0, abs=2 * hist.edge / hist.bins)


def test_empty_update_counts_nothing():
    hist = StreamingHistogram(bins=64)
    hist.update(np.zeros((0, 3), np.float32))
    assert hist.samples == 0 and hist.counts.sum() == 0


def test_bins_must_be_a_multiple_of_four():
    with pytest.raises(ValueError):
        StreamingHistogram(bins=30)
