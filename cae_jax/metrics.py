"""Detection metrics in numpy: frame-level AUC, ACC, EER, AP, ROC, and video-level aggregation.

Labels are 1 = fake, scores are fake probabilities. Ties are handled as scikit-learn does
(tied scores form one ROC point; AUC counts a tie as half a correct ordering).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    return labels, scores


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < labels.sum() < labels.size


def roc_curve(
    labels, scores, *, corners_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), from (0, 0) upwards.

    `corners_only` drops the points inside straight runs of the curve, as scikit-learn's
    `roc_curve(drop_intermediate=True)` does (the curve and its AUC stay the same).
    """
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = last_of_tie + 1 - tps
    if corners_only and tps.size > 2:
        corner = np.r_[True, np.diff(fps, 2) != 0, True] | np.r_[True, np.diff(tps, 2) != 0, True]
        last_of_tie, tps, fps = last_of_tie[corner], tps[corner], fps[corner]
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def auc(labels, scores) -> float:
    """Area under the ROC curve; NaN unless both classes are present."""
    labels, scores = _check(labels, scores)
    if not _both_classes(labels):
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def average_precision(labels, scores) -> float:
    """Sum over thresholds of precision * recall increase (scikit-learn's definition)."""
    labels, scores = _check(labels, scores)
    if not _both_classes(labels):
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def eer(labels, scores) -> float:
    """Equal error rate: where the false positive and false negative rates cross."""
    labels, scores = _check(labels, scores)
    if not _both_classes(labels):
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    i = int(np.flatnonzero(fnr <= fpr)[0])  # fnr falls and fpr rises along the curve.
    if i == 0:
        return float(fpr[0])
    # Linear interpolation between the last point with fnr > fpr and the first with fnr <= fpr.
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    t = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def eer_nearest_point(labels, scores) -> float:
    """DeepfakeBench's EER: the false positive rate at the corner of the ROC curve where
    |fnr - fpr| is smallest (no interpolation, unlike `eer`)."""
    labels, scores = _check(labels, scores)
    if not _both_classes(labels):
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores, corners_only=True)
    return float(fpr[np.argmin(np.abs(1.0 - tpr - fpr))])


def accuracy(labels, scores, threshold: float = 0.5) -> float:
    labels, scores = _check(labels, scores)
    if not labels.size:
        return float("nan")
    return float(np.mean((scores >= threshold) == labels.astype(bool)))


def frame_metrics(labels, scores) -> dict[str, float]:
    """Frame-level AUC, ACC at 0.5, EER and AP, and the frame count."""
    labels, scores = _check(labels, scores)
    return {
        "auc": auc(labels, scores),
        "acc": accuracy(labels, scores),
        "eer": eer(labels, scores),
        "ap": average_precision(labels, scores),
        "frames": int(labels.size),
    }


def video_scores(
    video_keys: Sequence[str], labels, scores
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean frame probability per video: (keys, labels, scores), sorted by key.

    Keys must name a video uniquely across datasets and methods (e.g. "dataset/method/id"):
    the same file name under two methods is two videos. A video whose frames disagree on
    the label is an error, since it means two videos share a key.
    """
    labels, scores = _check(labels, scores)
    keys = np.asarray(video_keys, dtype=object)
    if keys.size != labels.size:
        raise ValueError(f"{keys.size} video keys but {labels.size} scores")
    unique, inverse = np.unique(keys.astype(str), return_inverse=True)
    counts = np.bincount(inverse, minlength=unique.size)
    mean = np.bincount(inverse, weights=scores, minlength=unique.size) / counts
    fake_frames = np.bincount(inverse, weights=labels, minlength=unique.size)
    mixed = (fake_frames != 0) & (fake_frames != counts)
    if mixed.any():
        raise ValueError(f"video {unique[mixed][0]!r} has both real and fake frames")
    return list(unique), (fake_frames > 0).astype(np.int64), mean


def video_metrics(video_keys: Sequence[str], labels, scores) -> dict[str, float]:
    """Video-level AUC and ACC at 0.5 of mean frame probabilities, and the video count."""
    _, video_labels, video_probs = video_scores(video_keys, labels, scores)
    return {
        "auc": auc(video_labels, video_probs),
        "acc": accuracy(video_labels, video_probs),
        "videos": len(video_labels),
    }


# Operating points: thresholds picked on one split (validation) and applied to another.
# A face is called fake when its probability is >= the threshold.
OPERATING_POINTS = {"eer": None, "fpr1": 0.01, "fpr5": 0.05, "fpr10": 0.10}


def _finite_threshold(threshold: float, scores: np.ndarray) -> float:
    """ROC's first threshold is +inf (nothing called fake); JSON needs a number that does so."""
    return float(np.nextafter(scores.max(), np.inf)) if np.isinf(threshold) else float(threshold)


def operating_points(labels, scores) -> dict[str, float]:
    """Thresholds for each of `OPERATING_POINTS`; NaN unless both classes are present.

    "eer": the ROC corner where |fnr - fpr| is smallest (ties: the higher threshold);
    "fprN": the lowest threshold whose false positive rate is at most N%, i.e. the largest
    true positive rate that keeps the false alarms within the budget.
    """
    labels, scores = _check(labels, scores)
    if not _both_classes(labels):
        return {name: float("nan") for name in OPERATING_POINTS}
    fpr, tpr, thresholds = roc_curve(labels, scores)
    points = {}
    for name, budget in OPERATING_POINTS.items():
        if budget is None:
            i = int(np.argmin(np.abs(1.0 - tpr - fpr)))
        else:
            i = int(np.flatnonzero(fpr <= budget)[-1])
        points[name] = _finite_threshold(thresholds[i], scores)
    return points


def rates_at(labels, scores, threshold: float) -> dict[str, float]:
    """TPR, FPR and balanced accuracy when scores >= `threshold` are called fake."""
    labels, scores = _check(labels, scores)
    fake = scores >= threshold
    real_labels, fake_labels = labels == 0, labels == 1
    tpr = float(fake[fake_labels].mean()) if fake_labels.any() else float("nan")
    fpr = float(fake[real_labels].mean()) if real_labels.any() else float("nan")
    return {"tpr": tpr, "fpr": fpr, "balanced_acc": (tpr + 1.0 - fpr) / 2.0}


# Calibration: does a probability of 0.8 mean that 80% of such faces are fake?
CALIBRATION_BINS = 15


def reliability(labels, scores, bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
    """Per equal-width probability bin ([0, 1/bins), ..., [1 - 1/bins, 1]): face count, mean
    probability and fraction fake (NaN in empty bins)."""
    labels, scores = _check(labels, scores)
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count,
                "mean_prob": np.bincount(index, weights=scores, minlength=bins) / count,
                "fraction_fake": np.bincount(index, weights=labels, minlength=bins) / count}


def expected_calibration_error(labels, scores, bins: int = CALIBRATION_BINS) -> float:
    """Sum over bins of |fraction fake - mean probability|, weighted by the bin's share."""
    bins_ = reliability(labels, scores, bins)
    used = bins_["count"] > 0
    if not used.any():
        return float("nan")
    gap = np.abs(bins_["fraction_fake"][used] - bins_["mean_prob"][used])
    return float(np.sum(gap * bins_["count"][used]) / bins_["count"].sum())
