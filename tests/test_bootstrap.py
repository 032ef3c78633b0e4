"""Bootstrap intervals of AUC over videos: the vectorised resamples against a plain loop that
materialises each resample, grouping by video, the paired difference."""

import numpy as np
import pytest

from cae_jax import bootstrap, metrics


def video_scores(seed, videos=30, frames=8, within=0.0):
    """Per video a label and a video-level score shift; `within` scales the frame noise
    (small: frames of a video strongly correlated)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, videos)
    labels[:2] = (0, 1)
    shift = rng.normal(0.5 * labels, 1.0)
    video = np.repeat(np.arange(videos), frames)
    probs = shift[video] + within * rng.normal(size=video.size)
    keys = [f"ds/m/{v:03d}" for v in video]
    return keys, labels[video], probs


def reference_aucs(keys, labels, probs, resamples, seed):
    """One resample at a time: the drawn videos' frames, repeated, scored by metrics.auc."""
    groups = bootstrap.group_ids(keys)
    counts = bootstrap.resample_counts(groups, labels, resamples, seed)
    frame, video = [], []
    video_keys, video_labels, video_probs = metrics.video_scores(keys, labels, probs)
    for c in counts:
        rows = np.concatenate([np.flatnonzero(groups == g).repeat(n) for g, n in enumerate(c)])
        frame.append(metrics.auc(labels[rows], probs[rows]))
        drawn = np.arange(len(video_keys)).repeat(c)
        video.append(metrics.auc(video_labels[drawn], video_probs[drawn]))
    return {"frame": np.array(frame), "video": np.array(video)}


@pytest.mark.parametrize("ties", [False, True])
def test_interval_equals_a_plain_loop(ties):
    keys, labels, probs = video_scores(0, videos=12, frames=5, within=0.5)
    if ties:
        probs = np.round(probs * 2) / 2
    ours = bootstrap.frame_and_video_intervals(keys, labels, probs, resamples=200, seed=3)
    reference = reference_aucs(keys, labels, probs, 200, 3)
    for level in ("frame", "video"):
        np.testing.assert_allclose(ours[level], bootstrap.interval(reference[level]), atol=1e-12)
        assert reference[level].std() > 0.01  # The resamples differ.
    groups = bootstrap.group_ids(keys)
    counts = bootstrap.resample_counts(groups, labels, 200, 3)
    each = bootstrap.resampled_frame_and_video(keys, labels, probs, groups, counts)
    for level in ("frame", "video"):
        np.testing.assert_allclose(each[level], reference[level], atol=1e-12)
    again = bootstrap.frame_and_video_intervals(keys, labels, probs, resamples=200, seed=3)
    assert again == ours
    other = bootstrap.frame_and_video_intervals(keys, labels, probs, resamples=200, seed=4)
    assert other != ours


def test_chunks_give_the_same_aucs(monkeypatch):
    keys, labels, probs = video_scores(1, videos=10, frames=4, within=1.0)
    groups = bootstrap.group_ids(keys)
    counts = bootstrap.resample_counts(groups, labels, 50, 0)
    whole = bootstrap.resampled_aucs(labels, probs, groups, counts)
    monkeypatch.setattr(bootstrap, "CHUNK", 7 * labels.size)  # 7 resamples a chunk.
    np.testing.assert_array_equal(bootstrap.resampled_aucs(labels, probs, groups, counts), whole)


def test_resamples_keep_each_class_count():
    keys, labels, _ = video_scores(2)
    groups = bootstrap.group_ids(keys)
    counts = bootstrap.resample_counts(groups, labels, 100, 0)
    video_label = np.bincount(groups, weights=labels) > 0
    assert (counts[:, video_label].sum(1) == video_label.sum()).all()
    assert (counts[:, ~video_label].sum(1) == (~video_label).sum()).all()


def test_video_grouping_widens_the_interval():
    # Frames of a video nearly equal: 240 frames carry the information of 30 videos.
    keys, labels, probs = video_scores(5, videos=30, frames=8, within=0.05)
    by_video = bootstrap.auc_interval(labels, probs, keys, resamples=1000)
    by_frame = bootstrap.auc_interval(labels, probs, [str(i) for i in range(len(keys))],
                                      resamples=1000)
    assert by_video[0] <= metrics.auc(labels, probs) <= by_video[1]
    assert by_video[1] - by_video[0] > 2 * (by_frame[1] - by_frame[0])


def test_one_class_gives_nan():
    assert np.isnan(bootstrap.auc_interval([1, 1], [0.2, 0.3], ["a", "b"])).all()


def test_paired_difference():
    keys, labels, probs = video_scores(6, videos=40, frames=4, within=0.3)
    same = bootstrap.paired_difference(keys, labels, probs, probs + 1.0, resamples=300)
    assert same["frame"]["difference"] == 0 and same["frame"]["interval"] == [0.0, 0.0]
    assert not same["video"]["excludes_zero"]
    rng = np.random.default_rng(0)
    good = labels + rng.normal(0, 0.5, probs.size)
    noisy = good + rng.normal(0, 3, probs.size)
    better = bootstrap.paired_difference(keys, labels, good, noisy, resamples=300)
    assert better["frame"]["difference"] == pytest.approx(
        metrics.auc(labels, good) - metrics.auc(labels, noisy))
    assert better["frame"]["excludes_zero"] and better["frame"]["interval"][0] > 0
