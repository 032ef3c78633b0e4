"""DeepfakeBench's evaluation protocol (SCLBD/DeepfakeBench training/test.py, metrics/utils.py):
their metrics on their test lists, beside their published numbers.

Metrics as they compute them: frame AUC, EER (the false positive rate at the ROC corner nearest
fnr = fpr), AP, ACC of prob > 0.5, and video AUC of the mean frame probability per video. One
difference, on purpose: they group frames into videos by the name of the folder holding them,
which merges FF++'s "000_003" of every method into one video; here a video is its full id
("dataset/method/LABEL/COMP/VIDEO", see data_prep/deepfakebench.py).
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from cae_jax import eval_tables, metrics

# DeepfakeBench's published frame-level AUC of Xception trained on FF++ c23 (their benchmark
# table, v1 paper and README), by the dataset names of their JSON files.
PUBLISHED_XCEPTION_FRAME_AUC = {
    "FaceForensics++": 0.9637,
    "Celeb-DF-v2": 0.7365,
    "DFDC": 0.7077,
    "DFDCP": 0.7374,
    "DeepFakeDetection": 0.8163,
}


def protocol_metrics(labels, probs, video_keys) -> dict[str, float]:
    """Their five numbers for one test set, plus frame and video counts."""
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, np.float64)
    _, video_labels, video_probs = metrics.video_scores(video_keys, labels, probs)
    return {
        "frame_auc": metrics.auc(labels, probs),
        "video_auc": metrics.auc(video_labels, video_probs),
        "eer": metrics.eer_nearest_point(labels, probs),
        "ap": metrics.average_precision(labels, probs),
        "acc": float(np.mean((probs > 0.5) == labels.astype(bool))) if labels.size else np.nan,
        "frames": int(labels.size),
        "videos": len(video_labels),
    }


def dataset_name(data_dir: str) -> str:
    """Their name of a prepared dataset (recorded by `prepare deepfakebench`), else the dir's."""
    manifest = epath.Path(data_dir) / "manifest.json"
    if manifest.exists():
        source = json.loads(manifest.read_text()).get("deepfakebench", {})
        if source.get("name"):
            return source["name"]
    return epath.Path(data_dir.rstrip("/")).name


def report(scores: dict[str, np.ndarray], keys: list[str], name: str,
           intervals: dict | None = None) -> dict:
    """One row of the protocol table: their name of the test set (`dataset_name`), our
    metrics with the bootstrap intervals of frame and video AUC if given
    (bootstrap.frame_and_video_intervals), their published frame AUC."""
    intervals = intervals or {}
    return {"dataset": name, **protocol_metrics(scores["label"], scores["prob"], keys),
            "frame_auc_ci": intervals.get("frame"), "video_auc_ci": intervals.get("video"),
            "published_frame_auc": PUBLISHED_XCEPTION_FRAME_AUC.get(name)}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| test set | frame AUC | 95% CI | DeepfakeBench Xception frame AUC (published) |"
        " video AUC | 95% CI | EER | AP | ACC | frames | videos |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ci = eval_tables.interval_text
    for r in rows:
        published = "-" if r["published_frame_auc"] is None else f"{r['published_frame_auc']:.4f}"
        lines.append(
            f"| {r['dataset']} | {r['frame_auc']:.4f} | {ci(r.get('frame_auc_ci'))} | "
            f"{published} | {r['video_auc']:.4f} | {ci(r.get('video_auc_ci'))} | "
            f"{r['eer']:.4f} | {r['ap']:.4f} | {r['acc']:.4f} | {r['frames']} | {r['videos']} |"
        )
    return "\n".join(lines) + "\n"
