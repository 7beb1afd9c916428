"""A histogram that streams: constant memory whatever the number of calibration samples.

The range is symmetric, [-edge, edge], and doubles when a sample falls outside it; doubling
merges neighbouring bins pairwise, so no sample has to be seen twice.
"""
from __future__ import annotations

import numpy as np


class StreamingHistogram:
    def __init__(self, bins: int = 4096, sample_elements: int = 1 << 18, seed: int = 0):
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins = bins
        self.sample_elements = sample_elements
        self.counts = np.zeros(bins, dtype=np.int64)
        self.edge = 0.0
        self.min = np.inf
        self.max = -np.inf
        self.samples = 0
        self._rng = np.random.default_rng(seed)

    def update(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        self.samples += 1
        low, high = float(flat.min()), float(flat.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        reach = max(abs(low), abs(high))
        if reach > self.edge:
            self._grow(reach)
        if flat.size > self.sample_elements:
            # A strided subsample keeps the distribution's shape; min/max above saw every element.
            offset = int(self._rng.integers(flat.size % self.sample_elements + 1))
            flat = flat[offset::flat.size // self.sample_elements][: self.sample_elements]
        if self.edge == 0.0:
            self.counts[self.bins // 2] += flat.size
            return
        index = np.floor((flat.astype(np.float64) + self.edge) * (self.bins / (2 * self.edge))).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _grow(self, reach: float) -> None:
        if self.edge == 0.0:
            had = self.counts.sum()
            self.edge = float(2.0 ** np.ceil(np.log2(reach))) if reach > 0 else 0.0
            self.counts[:] = 0
            if had:
                self.counts[self.bins // 2] = had  # earlier all-zero samples sit just right of zero
            return
        while self.edge < reach:
            half = self.bins // 2
            merged = self.counts.reshape(-1, 2).sum(axis=1)  # bins//2 merged bins covering the old range
            self.counts = np.zeros(self.bins, dtype=np.int64)
            self.counts[half // 2: half // 2 + half] = merged
            self.edge *= 2.0

    @property
    def centers(self) -> np.ndarray:
        width = 2 * self.edge / self.bins
        return -self.edge + width * (np.arange(self.bins) + 0.5)

    def nonzero(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin centres and counts of the occupied bins, clamped to the observed min/max."""
        mask = self.counts > 0
        centers = np.clip(self.centers[mask], self.min, self.max)
        return centers, self.counts[mask].astype(np.float64)

    def percentile(self, q: float) -> float:
        centers, counts = self.nonzero()
        cumulative = np.cumsum(counts) / counts.sum()
        return float(centers[min(np.searchsorted(cumulative, q / 100.0), len(centers) - 1)])
