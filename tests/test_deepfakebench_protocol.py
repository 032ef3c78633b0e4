"""`evaluate --protocol deepfakebench`: their metrics, checked against scikit-learn computed the
way their metrics/utils.py does, on fixed scores; the table; their configs."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cae_jax import config as config_lib
from cae_jax import deepfakebench, metrics


def fixed_scores(seed: int, n: int = 300, ties: bool = True):
    """3-10 frames per video; scores rounded to 0.05 (many ties, long straight ROC runs)."""
    rng = np.random.default_rng(seed)
    videos = np.repeat(np.arange(60), rng.integers(3, 11, 60))[:n]
    video_label = rng.integers(0, 2, 60)
    labels = video_label[videos]
    probs = np.clip(rng.normal(0.4 + 0.2 * labels, 0.25), 0, 1)
    if ties:
        probs = np.round(probs * 20) / 20
    keys = [f"ds/{'FF-DF' if label else 'FF-real'}/{v:03d}" for v, label in zip(
        videos, labels, strict=True)]
    return labels, probs, keys


def their_metrics(labels, probs, keys):
    """DeepfakeBench's get_test_metrics (sklearn), grouping videos by our keys."""
    fpr, tpr, _ = skm.roc_curve(labels, probs, pos_label=1)
    grouped = {}
    for key, p, label in zip(keys, probs, labels, strict=True):
        grouped.setdefault(key, []).append((p, label))
    video_probs = [np.mean([p for p, _ in v]) for v in grouped.values()]
    video_labels = [int(np.mean([label for _, label in v])) for v in grouped.values()]
    return {
        "frame_auc": skm.auc(fpr, tpr),
        "eer": fpr[np.nanargmin(np.absolute((1 - tpr) - fpr))],
        "ap": skm.average_precision_score(labels, probs),
        "acc": ((probs > 0.5).astype(int) == labels).sum() / len(labels),
        "video_auc": skm.roc_auc_score(video_labels, video_probs),
        "frames": len(labels),
        "videos": len(grouped),
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [True, False])
def test_protocol_metrics_equal_theirs(seed, ties):
    labels, probs, keys = fixed_scores(seed, ties=ties)
    ours = deepfakebench.protocol_metrics(labels, probs, keys)
    theirs = their_metrics(labels, probs, keys)
    if ties:  # Tied video means can round apart differently in two summation orders.
        del ours["video_auc"], theirs["video_auc"]
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_roc_corners_are_sklearns_curve():
    labels, probs, _ = fixed_scores(7)
    ours = metrics.roc_curve(labels, probs, corners_only=True)
    theirs = skm.roc_curve(labels, probs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b)


def test_table_puts_published_numbers_beside_ours():
    labels, probs, keys = fixed_scores(0)
    row = {"dataset": "Celeb-DF-v2", **deepfakebench.protocol_metrics(labels, probs, keys),
           "published_frame_auc": deepfakebench.PUBLISHED_XCEPTION_FRAME_AUC["Celeb-DF-v2"]}
    other = {**row, "dataset": "mine", "published_frame_auc": None}
    lines = deepfakebench.markdown_table([row, other]).splitlines()
    assert lines[2].startswith(f"| Celeb-DF-v2 | {row['frame_auc']:.4f} | - | 0.7365 | ")
    assert lines[3].startswith(f"| mine | {row['frame_auc']:.4f} | - | - | ")


def test_configs_share_data_and_schedule():
    xception = config_lib.load_config("configs/dfb_xception.py")
    cae = config_lib.load_config("configs/dfb_cae.py")
    assert (xception.model.image_size, xception.train.batch_size, xception.optim.learning_rate,
            xception.optim.weight_decay) == (256, 32, 2e-4, 5e-4)
    assert xception.loss.recon_weight == 0 and xception.model.classifier.hidden == ()
    assert cae.loss.recon_weight == 1 and cae.model.classifier.hidden == (256,)
    differ = {k for k in ("model", "loss") if xception[k].to_dict() != cae[k].to_dict()}
    assert differ == {"model", "loss"}
    for part in ("optim", "train", "input", "mesh"):
        assert xception[part].to_dict() == cae[part].to_dict()
