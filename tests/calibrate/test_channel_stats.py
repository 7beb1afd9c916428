"""Per-channel calibration statistics and the outlier channels and samples read from them."""
import numpy as np
from onnx import helper

from onnxrepq.calibrate.channel_stats import ChannelStats, collect_channel_stats, find_outliers, outlier_cover
from tests.models_for_tests import make_model, weights


def test_stats_stream_over_batches_like_one_pass():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((6, 4, 5, 5)).astype(np.float32)
    data[:, 2] *= 50.0
    streamed, whole = ChannelStats(), ChannelStats()
    for start in (0, 2, 3):
        streamed.update(data[start:start + (2 if start == 0 else 1 if start == 2 else 3)])
    whole.update(data)
    assert np.allclose(streamed.channel_absmax, np.abs(data).max(axis=(0, 2, 3)))
    assert np.allclose(streamed.channel_mean_abs, np.abs(data).mean(axis=(0, 2, 3)))
    assert np.allclose(streamed.sample_absmax, np.abs(data).reshape(6, -1).max(axis=1))
    assert streamed.sample_channel == [2] * 6
    assert len(streamed.sample_absmax) == 6  # one scalar per sample, nothing per element


def test_outlier_channels_and_samples_are_found_against_the_median():
    rng = np.random.default_rng(1)
    data = rng.uniform(-1, 1, (20, 8, 4, 4)).astype(np.float32)
    data[:, 5] *= 30.0       # one channel carries a large range in every sample
    data[:, 1] = 0.0         # a dead channel must not drag the median down
    stats = ChannelStats()
    stats.update(data)
    found = find_outliers(stats, factor=8.0)
    assert found.channels == (5,)
    assert found.samples == ()
    data[13, 0, 0, 0] = 5000.0   # one sample with a spike
    stats = ChannelStats()
    stats.update(data)
    found = find_outliers(stats, factor=8.0)
    assert found.samples == (13,) and 0 in found.channels
    row = found.as_row()
    assert row["outlier_sample_count"] == 1 and row["sample_range_ratio"] > 100


def test_collect_reads_intermediate_tensors_with_onnxruntime():
    w = weights(3, 2, 1, 1)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])],
                       {"x": [1, 2, 3, 3]}, {"y": [1, 3, 3, 3]}, {"w": w})
    feeds = [{"x": np.random.default_rng(s).standard_normal((1, 2, 3, 3)).astype(np.float32)} for s in range(5)]
    stats = collect_channel_stats(model, ["c"], feeds)["c"]
    expected = np.max([np.abs(np.einsum("oi,nihw->nohw", w[:, :, 0, 0], f["x"])).max(axis=(0, 2, 3))
                       for f in feeds], axis=0)
    assert np.allclose(stats.channel_absmax, expected, rtol=1e-5)
    assert len(stats.sample_absmax) == 5


def test_typical_channel_range_is_the_median_sample_extreme_and_memory_stays_fixed():
    """Exact while the samples fit the reservoir; past it the rows stay at reservoir_size (streaming)
    and the median of the kept rows is still a middle sample, not the largest."""
    rng = np.random.default_rng(4)
    data = rng.standard_normal((200, 3, 6, 6)).astype(np.float32) * np.array([1.0, 2.0, 4.0])[None, :, None, None]
    exact = ChannelStats()
    for start in range(0, 20, 5):
        exact.update(data[start:start + 5])
    low, high = exact.typical_channel_range()
    np.testing.assert_allclose(high, np.median(data[:20].max(axis=(2, 3)), axis=0), rtol=1e-6)
    np.testing.assert_allclose(low, np.median(data[:20].min(axis=(2, 3)), axis=0), rtol=1e-6)
    streamed = ChannelStats()
    for start in range(0, 200, 8):
        streamed.update(data[start:start + 8])
    assert streamed.reservoir_max.shape == (32, 3) and streamed.samples_seen == 200
    per_sample_max = data.max(axis=(2, 3))
    rank = (per_sample_max < streamed.typical_channel_range()[1]).mean(axis=0)
    assert np.all((rank > 0.25) & (rank < 0.75))


def test_outlier_cover_keeps_consistent_outlier_channels_not_rare_spikes():
    """A channel 20x the rest in every sample sets the cover (its median-sample extremes); a spike
    in one sample of another channel makes that channel an outlier too, but does not widen the
    cover; without outlier channels there is no cover at all."""
    rng = np.random.default_rng(5)
    data = rng.uniform(-1, 1, (30, 16, 4, 4)).astype(np.float32)
    stats = ChannelStats()
    stats.update(data)
    assert outlier_cover(stats) is None
    data[:, 7] *= 20.0
    data[3, 2, 1, 1] = 500.0
    stats = ChannelStats()
    for sample in data:
        stats.update(sample[None])
    assert set(find_outliers(stats).channels) == {2, 7}
    lo, hi = outlier_cover(stats)
    assert hi == np.float32(np.median(data[:, 7].max(axis=(1, 2))))
    assert lo == np.float32(np.median(data[:, 7].min(axis=(1, 2))))
    assert 15 < hi < 20 and -20 < lo < -15   # far from the 500 spike
