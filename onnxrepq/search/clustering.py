"""Clustered non-uniform weights: per-output-channel k-means codebooks of 2^b centroids.

After ClusterQAT (arXiv 2402.07200), done post-training: each output channel's weights are
replaced by the nearest of 2^b centroids chosen by Lloyd's k-means, so a b-bit index per weight
addresses levels placed where the weights are instead of on an evenly spaced grid. The centroids
are held on the channel's int8 grid (codebook entries are int8, one float scale per channel), so
the decoded weight is an ordinary per-channel int8 tensor and onnxruntime runs its int8 kernels:
emit/codebook.py writes ``DequantizeLinear(Reshape(GatherElements(codebook, Cast(indices))))``,
which onnxruntime folds to a constant at session start (measured there).

Why the result can only be better than uniform b-bit weights on each channel: the first candidate
starts from exactly the uniform b-bit levels (scale from the same search), written on an int8 grid
that holds them exactly (step = uniform step / floor(int8 reach / b-bit reach)), and Lloyd steps on
a fixed grid never raise the squared error (nearest assignment; the grid point nearest a cluster's
mean is the best grid point for it). A second candidate runs Lloyd in float first and picks the
int8 scale afterwards, which reaches outliers that the uniform scale search clipped. Each channel
keeps the candidate with the lower error; at 4 bits the second wins on 540 of 544 channels of
zoo/repvgg and 807 of 960 of mobileone (about half the first one's error on repvgg), the first keeps
the guarantee. Everything is deterministic: no random initialisation, so no seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .quant_grid import IntGrid

_ITERATIONS = 30
_SCALE_BITS = 32   # one float32 scale per channel


@dataclass(frozen=True)
class Codebook:
    """One layer's clustered weight: channel c reads ``scale[c] * levels[c, indices[c, i]]``.

    ``indices`` and the decoded rows are in channel-first order (the channel axis moved to the
    front, the rest flattened); ``decode`` puts the weight back in its own layout.
    """

    indices: np.ndarray   # uint8 [channels, weights per channel]
    levels: np.ndarray    # int8 [channels, entries], on ``grid``, sorted per channel
    scale: np.ndarray     # float32 [channels]
    axis: int
    shape: tuple[int, ...]
    bits: int
    grid: IntGrid

    @property
    def integers(self) -> np.ndarray:
        """The int8 weight in channel-first order, as DequantizeLinear will read it."""
        return np.take_along_axis(self.levels, self.indices.astype(np.int64), axis=1)

    def decode(self) -> np.ndarray:
        rows = self.integers.astype(np.float32) * self.scale[:, None]
        moved = [self.shape[self.axis]] + [d for i, d in enumerate(self.shape) if i != self.axis]
        return np.moveaxis(rows.reshape(moved), 0, self.axis)

    def as_row(self) -> dict:
        """The report's per-layer words for this storage."""
        entries = self.levels.shape[1]
        return {"weight_storage": f"codebook {entries} x int8 [{self.grid.qmin}, {self.grid.qmax}] per channel,"
                                  f" {self.bits}-bit indices (held as uint8)",
                "codebook_entries": entries}


def nominal_bits(weight_count: int, channels: int, bits: int, codebook_entries: int = 0,
                 entry_bits: int = 8) -> int:
    """Bits a layer's weights take: ``bits`` per weight, a float32 scale per channel, and for a
    clustered layer its per-channel codebook. Counted as quantization papers count sizes, so that
    uniform and clustered layers are compared at what they would cost packed."""
    return weight_count * bits + channels * (_SCALE_BITS + codebook_entries * entry_bits)


def cluster_weight(weight: np.ndarray, axis: int, uniform_scale: np.ndarray, uniform: IntGrid, bits: int,
                   container: IntGrid) -> Codebook:
    """k-means codebooks of ``2^bits`` int8 entries per channel along ``axis``.

    ``uniform_scale`` and ``uniform`` are the uniform b-bit quantization the pipeline would emit
    (the starting point); ``container`` is the int8 grid the codebook entries live on, the one
    8-bit weights would use on this target (reduced to [-64, 64] where u8 x s8 pairs saturate).
    """
    rows = np.moveaxis(np.asarray(weight, np.float64), axis, 0).reshape(weight.shape[axis], -1)
    reach = min(container.qmax, -container.qmin)
    entries = min(2 ** bits, 2 * reach + 1)
    uniform_levels = np.arange(uniform.qmin, uniform.qmax + 1, dtype=np.float64)

    # Candidate 1: the uniform levels exactly, on a grid `multiple` times finer than theirs.
    multiple = max(1, reach // max(uniform.qmax, -uniform.qmin))
    anchored_step = uniform_scale.astype(np.float64) / multiple
    anchored = np.broadcast_to(uniform_levels * multiple, (len(rows), len(uniform_levels)))
    anchored = _lloyd(rows, anchored, anchored_step, reach, entries)

    # Candidate 2: free centroids first, then the int8 scale that holds the widest of them.
    free = _lloyd(rows, uniform_levels * uniform_scale.astype(np.float64)[:, None], None, None, entries)
    free_step = np.maximum(np.abs(free).max(axis=1), 1e-12) / reach
    free = _lloyd(rows, np.rint(free / free_step[:, None]), free_step, reach, entries)

    errors = [_squared_error(rows, levels * step[:, None]) for levels, step in
              ((anchored, anchored_step), (free, free_step))]
    take_free = errors[1] < errors[0]
    levels = np.where(take_free[:, None], free, anchored)
    step = np.where(take_free, free_step, anchored_step)
    indices = _assign(rows, levels * step[:, None])
    return Codebook(indices.astype(np.uint8), levels.astype(np.int8), step.astype(np.float32), axis,
                    tuple(weight.shape), bits, container)


def _lloyd(rows: np.ndarray, centroids: np.ndarray, step, reach, entries: int) -> np.ndarray:
    """Lloyd's iterations per row, on the integer grid ``step`` x [-reach, reach] when ``step`` is given
    (centroids then in grid units) or in float. Grows to ``entries`` centroids by splitting the
    cluster with the largest error, each split followed by iterations, so no step raises the error."""
    scale = np.ones(len(rows)) if step is None else step
    centroids = np.sort(np.asarray(centroids, np.float64), axis=1)
    while True:
        centroids = _iterate(rows, centroids, scale, reach)
        if centroids.shape[1] >= entries:
            return centroids
        centroids = np.sort(np.concatenate([centroids, _split(rows, centroids, scale, reach)], axis=1), axis=1)


def _iterate(rows, centroids, scale, reach) -> np.ndarray:
    for _ in range(_ITERATIONS):
        index = _assign(rows, centroids * scale[:, None])
        sums, counts = _cluster_sums(rows, index, centroids.shape[1])
        means = np.divide(sums, counts, out=centroids * scale[:, None], where=counts > 0) / scale[:, None]
        updated = np.sort(means if reach is None else np.clip(np.rint(means), -reach, reach), axis=1)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _split(rows, centroids, scale, reach) -> np.ndarray:
    """One new centroid per row: the mean of the upper half of the row's worst cluster."""
    values = centroids * scale[:, None]
    index = _assign(rows, values)
    picked = np.take_along_axis(values, index, axis=1)
    worst = np.argmax(_cluster_sums((rows - picked) ** 2, index, centroids.shape[1])[0], axis=1)
    upper = (index == worst[:, None]) & (rows > picked)
    counts = upper.sum(axis=1)
    fallback = values[np.arange(len(rows)), worst]
    new = np.where(counts > 0, np.where(upper, rows, 0.0).sum(axis=1) / np.maximum(counts, 1), fallback) / scale
    return (new if reach is None else np.clip(np.rint(new), -reach, reach))[:, None]


def _assign(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (sorted per row), for all rows in one search: each row is shifted
    by a multiple of a span wider than every value, so the rows' boundaries never interleave."""
    bounds = (centroids[:, 1:] + centroids[:, :-1]) / 2
    span = 4.0 * max(float(np.abs(rows).max(initial=0.0)), float(np.abs(centroids).max(initial=0.0)), 1e-30)
    offset = np.arange(len(rows), dtype=np.float64)[:, None] * span
    found = np.searchsorted((bounds + offset).ravel(), (rows + offset).ravel(), side="left")
    return found.reshape(rows.shape) - np.arange(len(rows))[:, None] * bounds.shape[1]


def _cluster_sums(rows, index, entries: int) -> tuple[np.ndarray, np.ndarray]:
    flat = (index + np.arange(len(rows))[:, None] * entries).ravel()
    size = len(rows) * entries
    sums = np.bincount(flat, weights=np.asarray(rows, np.float64).ravel(), minlength=size)
    counts = np.bincount(flat, minlength=size)
    return sums.reshape(len(rows), entries), counts.reshape(len(rows), entries)


def _squared_error(rows, centroids) -> np.ndarray:
    picked = np.take_along_axis(centroids, _assign(rows, centroids), axis=1)
    return ((rows - picked) ** 2).sum(axis=1)
