"""Metrics against scikit-learn on random scores, and video aggregation by full video key."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cae_jax import metrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("quantize", [False, True])  # True: many tied scores.
def test_frame_metrics_match_sklearn(seed, quantize):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.random(300) + 0.3 * labels
    if quantize:
        scores = np.round(scores, 1)
    got = metrics.frame_metrics(labels, scores)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    assert got["acc"] == pytest.approx(skm.accuracy_score(labels, scores >= 0.5), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    ours_fpr, ours_tpr, _ = metrics.roc_curve(labels, scores)
    np.testing.assert_allclose(ours_fpr, fpr)
    np.testing.assert_allclose(ours_tpr, tpr)
    # EER: the crossing of FPR and FNR on sklearn's ROC, by linear interpolation.
    fnr = 1 - tpr
    i = np.flatnonzero(fnr <= fpr)[0]
    t = (fnr[i - 1] - fpr[i - 1]) / ((fnr[i - 1] - fpr[i - 1]) - (fnr[i] - fpr[i]))
    assert got["eer"] == pytest.approx(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]), abs=1e-12)
    assert 0.0 < got["eer"] < 0.5


def test_eer_of_separable_and_reversed_scores():
    labels = np.array([0, 0, 1, 1])
    assert metrics.eer(labels, [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert metrics.eer(labels, [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert np.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_video_aggregation_keeps_same_file_name_of_different_methods_apart():
    # "000.mp4" exists under two methods and as the real source: three distinct videos.
    keys = [f"ffpp/{m}/000.mp4" for m in ("real", "Deepfakes", "FaceSwap") for _ in range(2)]
    labels = [0, 0, 1, 1, 1, 1]
    scores = [0.2, 0.4, 0.9, 0.5, 0.1, 0.2]
    names, video_labels, probs = metrics.video_scores(keys, labels, scores)
    assert names == ["ffpp/Deepfakes/000.mp4", "ffpp/FaceSwap/000.mp4", "ffpp/real/000.mp4"]
    np.testing.assert_array_equal(video_labels, [1, 1, 0])
    np.testing.assert_allclose(probs, [0.7, 0.15, 0.3])
    got = metrics.video_metrics(keys, labels, scores)
    assert got == {"auc": 0.5, "acc": pytest.approx(2 / 3), "videos": 3}


def test_video_key_shared_by_real_and_fake_frames_is_an_error():
    with pytest.raises(ValueError, match="both real and fake"):
        metrics.video_scores(["000.mp4", "000.mp4"], [0, 1], [0.1, 0.9])


def test_operating_points_by_brute_force():
    """Each threshold against a search over every candidate cut of the scores."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 2)  # Rounded: ties between classes.
    points = metrics.operating_points(labels, scores)
    cuts = np.r_[np.unique(scores), np.nextafter(scores.max(), np.inf)]
    rates = [metrics.rates_at(labels, scores, t) for t in cuts]
    for name, budget in (("fpr1", 0.01), ("fpr5", 0.05), ("fpr10", 0.10)):
        allowed = [t for t, r in zip(cuts, rates, strict=True) if r["fpr"] <= budget]
        assert points[name] == pytest.approx(min(allowed))
        assert metrics.rates_at(labels, scores, points[name])["fpr"] <= budget
    gaps = [abs(1 - r["tpr"] - r["fpr"]) for r in rates]
    best = max(t for t, g in zip(cuts, gaps, strict=True) if g == min(gaps))
    assert points["eer"] == pytest.approx(best)


def test_operating_points_edge_cases():
    assert metrics.operating_points([0, 1, 1], [0.9, 0.1, 0.2])["fpr1"] > 0.9  # Nothing fake.
    assert np.isnan(metrics.operating_points([1, 1], [0.2, 0.3])["eer"])
    rates = metrics.rates_at([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.2], 0.5)
    assert rates == {"tpr": 0.5, "fpr": 0.5, "balanced_acc": 0.5}
