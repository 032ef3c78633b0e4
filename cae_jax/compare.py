"""`cae-jax compare A_SCORES B_SCORES`: does model A's AUC differ from model B's on the same faces?

Both files are `evaluate --scores-out` outputs. Faces are matched by dataset, method, video id
and frame index (per `data` key); the two sets of faces must be the same, and so must each
face's label. For each test set, frame and video AUC of each model and the paired bootstrap
interval of their difference (bootstrap.paired_difference: the same video resamples weight
both models' faces), and whether it excludes 0.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from cae_jax import bootstrap, scores_file

FACE_KEY = ("data", "dataset", "method", "video_id", "frame_index")


def _faces(scores: dict[str, np.ndarray], path: str, split: str) -> dict[tuple, tuple]:
    """{face key: (label, prob)} of the unperturbed rows of `split`; a repeated face is an
    error."""
    keep = (scores["split"] == split) & (scores["perturbation"] == "")
    if not keep.any():
        raise ValueError(f"{path}: no unperturbed rows of split {split!r} (--split)")
    keys = list(zip(*(scores[k][keep].tolist() for k in FACE_KEY), strict=True))
    faces = dict(zip(keys, zip(scores["label"][keep].tolist(), scores["prob"][keep].tolist(),
                               strict=True), strict=True))
    if len(faces) != len(keys):
        raise ValueError(f"{path}: a face appears twice in split {split!r}")
    return faces


def compare(path_a: str, path_b: str, split: str = "test", *,
            resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    """{data key: paired_difference result}; mismatched faces or labels are a ValueError."""
    a = _faces(scores_file.read(path_a), path_a, split)
    b = _faces(scores_file.read(path_b), path_b, split)
    if a.keys() != b.keys():
        only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        example = next(iter(a.keys() - b.keys() or b.keys() - a.keys()))
        raise ValueError(f"{path_a} and {path_b} score different faces ({only_a} only in the "
                         f"first, {only_b} only in the second, e.g. {'/'.join(map(str, example))})")
    keys = sorted(a)
    if any(a[k][0] != b[k][0] for k in keys):
        raise ValueError(f"{path_a} and {path_b} disagree on the label of a face")
    result = {}
    for data in dict.fromkeys(k[0] for k in keys):
        mine = [k for k in keys if k[0] == data]
        video = ["/".join(map(str, k[1:4])) for k in mine]
        result[data] = bootstrap.paired_difference(
            video, [a[k][0] for k in mine], [a[k][1] for k in mine], [b[k][1] for k in mine],
            resamples=resamples, seed=seed)
    return result


def markdown_table(result: dict) -> str:
    lines = ["| data | level | AUC A | AUC B | A - B | 95% CI | excludes 0 |",
             "|---|---|---|---|---|---|---|"]
    for data, levels in result.items():
        for level, r in levels.items():
            low, high = r["interval"]
            lines.append(f"| {data} | {level} | {r['auc_a']:.4f} | {r['auc_b']:.4f} | "
                         f"{r['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                         f"{'yes' if r['excludes_zero'] else 'no'} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a_scores", help="model A's `evaluate --scores-out` file")
    parser.add_argument("b_scores", help="model B's, on the same faces")
    parser.add_argument("--split", default="test", help="split to compare (default: test)")
    parser.add_argument("--bootstrap", type=int, default=bootstrap.RESAMPLES,
                        help=f"video resamples (default {bootstrap.RESAMPLES})")
    parser.add_argument("--seed", type=int, default=bootstrap.SEED)
    parser.add_argument("--out", help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        if args.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
        result = compare(args.a_scores, args.b_scores, args.split, resamples=args.bootstrap,
                         seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(markdown_table(result), end="")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0
