"""Bootstrap confidence intervals for AUC, resampling whole videos.

Frames of one video are not independent draws (same face, same manipulation), so an interval
from resampled frames is too narrow: here the unit of resampling is the video, and each
resample's frames are its videos' frames, repeated as often as the video was drawn. Real and
fake videos are resampled separately (stratified), so every resample holds both classes.

The AUC of every resample comes from one sort of the scores: resample b weights frame i by
its video's draw count c[b, v(i)], and the weighted AUC is the weight of (fake, real) pairs
ordered right, ties half, over the weight of all pairs (the Mann-Whitney statistic). Memory is
bounded by doing `CHUNK` frame-weights at a time, not by a loop over resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cae_jax import metrics

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
CHUNK = 4_000_000  # Resample x frame weights held at once (float64: 32 MB).


def group_ids(keys: Sequence[str]) -> np.ndarray:
    """Integer id per row of its group key (e.g. "dataset/method/video")."""
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return inverse.ravel()


def resample_counts(groups: np.ndarray, labels, resamples: int, seed: int) -> np.ndarray:
    """[resamples, groups] draw counts: each class's groups drawn with replacement, as many as
    it has. A group's label is its rows' label (a group holding both is an error)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    n = int(groups.max()) + 1 if groups.size else 0
    fake_rows = np.bincount(groups, weights=labels, minlength=n)
    rows = np.bincount(groups, minlength=n)
    if np.any((fake_rows != 0) & (fake_rows != rows)):
        raise ValueError("a resampling group holds both real and fake rows")
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n), np.int64)
    for members in (np.flatnonzero(fake_rows == 0), np.flatnonzero(fake_rows > 0)):
        if members.size:
            counts[:, members] = rng.multinomial(members.size, np.full(members.size,
                                                                       1 / members.size),
                                                 size=resamples)
    return counts


def weighted_auc(labels, scores, weights: np.ndarray) -> np.ndarray:
    """AUC of every row of `weights` ([resamples, frames]: each frame's multiplicity)."""
    labels, scores = np.asarray(labels).astype(bool).ravel(), np.asarray(scores, np.float64).ravel()
    order = np.argsort(scores, kind="mergesort")
    labels, scores, weights = labels[order], scores[order], weights[:, order]
    tie_start = np.r_[0, np.flatnonzero(np.diff(scores)) + 1]
    tie_of = np.repeat(np.arange(tie_start.size), np.diff(np.r_[tie_start, scores.size]))
    real = np.where(labels, 0.0, weights)
    fake = np.where(labels, weights, 0.0)
    real_cum = np.cumsum(real, axis=1)
    real_below_tie = np.c_[np.zeros(len(weights)), real_cum[:, tie_start[1:] - 1]]
    real_in_tie = np.add.reduceat(real, tie_start, axis=1)
    credit = real_below_tie[:, tie_of] + 0.5 * real_in_tie[:, tie_of]
    pairs = fake.sum(axis=1) * real.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(fake * credit, axis=1) / pairs


def resampled_aucs(labels, scores, groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC per resample of `counts` ([resamples, groups]), rows weighted by their group's count."""
    scores = np.asarray(scores, np.float64).ravel()
    step = max(1, CHUNK // max(scores.size, 1))
    return np.concatenate([weighted_auc(labels, scores, counts[i: i + step][:, groups])
                           for i in range(0, len(counts), step)])


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """The percentile interval holding `level` of the resampled values."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def _group_counts(keys: Sequence[str], labels, resamples: int, seed: int):
    groups = group_ids(keys)
    return groups, resample_counts(groups, labels, resamples, seed)


def auc_interval(labels, scores, keys: Sequence[str], *, resamples: int = RESAMPLES,
                 seed: int = SEED) -> list[float]:
    """95% interval of the AUC, resampling the groups named by `keys` (one per row); NaNs
    unless both classes are present."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not 0 < labels.sum() < labels.size or resamples < 1:
        return [float("nan"), float("nan")]
    groups, counts = _group_counts(keys, labels, resamples, seed)
    return interval(resampled_aucs(labels, scores, groups, counts))


def resampled_frame_and_video(video_keys: Sequence[str], labels, probs, groups: np.ndarray,
                              counts: np.ndarray) -> dict[str, np.ndarray]:
    """Frame AUC and video AUC (mean probability per video) of every video resample."""
    _, video_labels, video_probs = metrics.video_scores(video_keys, labels, probs)
    return {"frame": resampled_aucs(labels, probs, groups, counts),
            "video": resampled_aucs(video_labels, video_probs, np.arange(len(video_labels)),
                                    counts)}


def frame_and_video_intervals(video_keys: Sequence[str], labels, probs, *,
                              resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Intervals of frame AUC and of video AUC, both from the same video resamples; NaNs
    unless both classes are present."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not 0 < labels.sum() < labels.size or resamples < 1:
        return {"frame": [float("nan")] * 2, "video": [float("nan")] * 2}
    groups, counts = _group_counts(video_keys, labels, resamples, seed)
    aucs = resampled_frame_and_video(video_keys, labels, probs, groups, counts)
    return {name: interval(values) for name, values in aucs.items()}


def paired_difference(video_keys: Sequence[str], labels, probs_a, probs_b, *,
                      resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """AUC(a) - AUC(b) of two models' scores on the same faces, frame and video level, with
    the interval of the difference over shared video resamples (paired: each resample
    weights both models' frames alike, so what the faces share cancels)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if not 0 < labels.sum() < labels.size:
        raise ValueError("comparing AUCs needs both real and fake faces")
    groups, counts = _group_counts(video_keys, labels, resamples, seed)
    a = resampled_frame_and_video(video_keys, labels, probs_a, groups, counts)
    b = resampled_frame_and_video(video_keys, labels, probs_b, groups, counts)
    point_a = metrics.frame_metrics(labels, probs_a)["auc"], metrics.video_metrics(
        video_keys, labels, probs_a)["auc"]
    point_b = metrics.frame_metrics(labels, probs_b)["auc"], metrics.video_metrics(
        video_keys, labels, probs_b)["auc"]
    result = {}
    for i, name in enumerate(("frame", "video")):
        low, high = interval(a[name] - b[name])
        result[name] = {"auc_a": point_a[i], "auc_b": point_b[i],
                        "difference": point_a[i] - point_b[i], "interval": [low, high],
                        "excludes_zero": bool(low > 0 or high < 0)}
    return result
