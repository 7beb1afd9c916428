"""Per-channel statistics of chosen float tensors, streamed over the calibration data.

The pooled histogram (histogram.py) says how wide a tensor is, not why: RepAPQ (arXiv 2402.16121)
observes that re-parameterized nets put their outliers in a few channels and a few samples.
Which channels matters to equalization (a per-channel scale can move a channel's range into the
next conv's weights); which samples matters to the range search (a range set by one sample in a
hundred is spent on that sample), and both together say which outliers a range must keep: a
channel large in a typical sample carries signal in every sample, a spike in a few samples does
not. Memory is one vector per tensor, a fixed reservoir of per-sample channel extremes, and two
scalars per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError
from .data import Feed
from .runner import run_finite_tensors, session_for


@dataclass
class ChannelStats:
    """Streaming statistics of one tensor along axis 1 (NCHW channels; a rank-1 tensor has one channel)."""

    channel_absmax: Optional[np.ndarray] = None     # max |x| per channel over every sample
    channel_abs_sum: Optional[np.ndarray] = None    # sum |x| per channel, for the mean below
    channel_min: Optional[np.ndarray] = None        # signed min per channel over every sample (high-bias absorption)
    elements_per_channel: int = 0
    sample_absmax: list = field(default_factory=list)   # max |x| of each sample, in feed order
    sample_channel: list = field(default_factory=list)  # the channel holding that maximum
    # A uniform sample (Vitter's algorithm R, seeded) of at most reservoir_size rows of per-sample
    # channel max and min: fixed memory, and exact while the calibration set is that small.
    reservoir_size: int = 32
    reservoir_max: Optional[np.ndarray] = None      # (rows, channels)
    reservoir_min: Optional[np.ndarray] = None
    samples_seen: int = 0
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    def update(self, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float32)
        if value.ndim < 2:
            value = value.reshape(-1, 1)
        batch, channels = value.shape[0], value.shape[1]
        per_sample = np.abs(value).reshape(batch, channels, -1)
        sample_channel_max = per_sample.max(axis=2)           # (batch, channels)
        if self.channel_absmax is None:
            self.channel_absmax = np.zeros(channels, np.float64)
            self.channel_abs_sum = np.zeros(channels, np.float64)
            self.channel_min = np.full(channels, np.inf)
        if channels != len(self.channel_absmax):
            raise CalibrationError(f"channel count changed between samples ({len(self.channel_absmax)} -> {channels})")
        self.channel_absmax = np.maximum(self.channel_absmax, sample_channel_max.max(axis=0))
        self.channel_abs_sum += per_sample.sum(axis=(0, 2), dtype=np.float64)
        self.elements_per_channel += batch * per_sample.shape[2]
        self.sample_absmax += [float(v) for v in sample_channel_max.max(axis=1)]
        self.sample_channel += [int(c) for c in sample_channel_max.argmax(axis=1)]
        signed = value.reshape(batch, channels, -1)
        sample_min = signed.min(axis=2)
        self.channel_min = np.minimum(self.channel_min, sample_min.min(axis=0))
        self._keep(signed.max(axis=2), sample_min)

    def _keep(self, sample_max: np.ndarray, sample_min: np.ndarray) -> None:
        if self.reservoir_max is None:
            self.reservoir_max = np.zeros((0, sample_max.shape[1]), np.float32)
            self.reservoir_min = np.zeros((0, sample_max.shape[1]), np.float32)
        for row_max, row_min in zip(sample_max, sample_min):
            if len(self.reservoir_max) < self.reservoir_size:
                self.reservoir_max = np.vstack([self.reservoir_max, row_max])
                self.reservoir_min = np.vstack([self.reservoir_min, row_min])
            else:
                slot = int(self._rng.integers(self.samples_seen + 1))
                if slot < self.reservoir_size:
                    self.reservoir_max[slot], self.reservoir_min[slot] = row_max, row_min
            self.samples_seen += 1

    def typical_channel_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel, the median over samples of the sample's min and of its max."""
        return np.median(self.reservoir_min, axis=0), np.median(self.reservoir_max, axis=0)

    @property
    def channel_mean_abs(self) -> np.ndarray:
        return self.channel_abs_sum / max(self.elements_per_channel, 1)

    def scaled(self, scale: np.ndarray) -> None:
        """The statistics of ``x / scale`` (per channel): what an exact per-channel rescale does to them."""
        self.channel_absmax = self.channel_absmax / scale
        self.channel_abs_sum = self.channel_abs_sum / scale
        self.channel_min = self.channel_min / scale
        if self.reservoir_max is not None:
            self.reservoir_max, self.reservoir_min = self.reservoir_max / scale, self.reservoir_min / scale


def collect_channel_stats(model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Feed]
                          ) -> dict[str, ChannelStats]:
    """Run ``model`` once over ``feeds`` and gather ChannelStats of each of ``tensors``."""
    stats = {name: ChannelStats() for name in tensors}
    if not stats:
        return stats
    session = session_for(model, list(tensors))
    for values in run_finite_tensors(session, feeds, list(tensors)):
        for name, value in values.items():
            stats[name].update(value)
    return stats


@dataclass(frozen=True)
class Outliers:
    """The channels and samples of one tensor whose range stands ``factor`` x above the median's."""

    channels: tuple[int, ...]
    samples: tuple[int, ...]
    channel_ratio: float   # largest channel range / median channel range
    sample_ratio: float    # largest sample maximum / median sample maximum

    @property
    def any(self) -> bool:
        return bool(self.channels or self.samples)

    def as_row(self) -> dict:
        """The report's view: counts, the first few indices, and the ratios."""
        return {"outlier_channels": list(self.channels[:16]), "outlier_channel_count": len(self.channels),
                "outlier_samples": list(self.samples[:16]), "outlier_sample_count": len(self.samples),
                "channel_range_ratio": round(self.channel_ratio, 3), "sample_range_ratio": round(self.sample_ratio, 3)}


def find_outliers(stats: ChannelStats, factor: float = 8.0) -> Outliers:
    """Channels whose absmax exceeds ``factor`` x the median channel absmax, likewise samples.

    The median, not the mean, is the reference: a handful of outliers 100x the bulk would drag a
    mean up far enough to hide themselves. Dead channels (absmax 0) are left out of the median,
    since Relu nets often carry many and they would make every live channel look like an outlier.
    """
    channels = _above(np.asarray(stats.channel_absmax if stats.channel_absmax is not None else []), factor)
    samples = _above(np.asarray(stats.sample_absmax, np.float64), factor)
    return Outliers(tuple(channels[0]), tuple(samples[0]), channels[1], samples[1])


def _above(values: np.ndarray, factor: float) -> tuple[list[int], float]:
    live = values[values > 0]
    if live.size == 0:
        return [], 1.0
    median = float(np.median(live))
    return [int(i) for i in np.flatnonzero(values > factor * median)], float(live.max() / median)


def outlier_cover(stats: ChannelStats, factor: float = 8.0) -> Optional[tuple[float, float]]:
    """The [lo, hi] a tensor's range must reach so that no outlier channel is clipped in a typical sample.

    A per-tensor search on the pooled histogram weighs a channel by its share of the elements, so
    a channel 10x the others is one tail bin it may clip; yet the next layer may read that channel
    as its main signal (re-parameterized nets put whole features there, RepAPQ). The outlier
    channels (find_outliers) are therefore kept up to their median-sample extremes; beyond those,
    in the rarer samples, clipping stays the search's choice, so spikes in a few samples do not
    stretch the grid. None when the tensor has no outlier channel.
    """
    if stats.reservoir_max is None or not len(stats.reservoir_max):
        return None
    channels = list(find_outliers(stats, factor).channels)
    if not channels:
        return None
    typical_min, typical_max = stats.typical_channel_range()
    return min(float(typical_min[channels].min()), 0.0), max(float(typical_max[channels].max()), 0.0)
