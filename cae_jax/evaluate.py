"""Evaluation protocol: scores of a checkpoint on prepared data, frame- and video-level metrics.

`cae-jax evaluate --checkpoint CKPT --data DIR[,DIR...] --split test --out metrics.json`
reports, per dataset and per manipulation method (that method's fakes against all reals):
frame-level AUC, ACC at 0.5, EER and AP, and video-level AUC and ACC of the mean frame
probability per video, keyed by "dataset/method/video_id" so equal file names under
different methods stay apart. Results are keyed by each data dir's name, or where two dirs
share a name by the shortest path suffix that tells them apart (`a/ffpp`, `b/ffpp`). It
also writes a cross-dataset table (markdown and JSON) and one ROC curve PNG per dataset
next to `--out`. The trainer validates with `score_split`
and `summarize` as well, so validation and test numbers mean the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict
from tqdm import tqdm

from cae_jax import eval_pipeline, metrics


def host_rows(x: jax.Array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in batch order."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
    return np.concatenate([shards[k] for k in sorted(shards)])


def score_split(
    config: ConfigDict,
    eval_step: Callable,
    state,
    mesh: jax.sharding.Mesh,
    data_dir: str,
    split: str,
    *,
    progress: bool = True,
    examples: int = 0,
) -> dict[str, np.ndarray]:
    """Every record of a split scored once: prob, recon_error, label and metadata arrays.

    Rows are the whole split's, in record order, on every host (padding dropped): each host
    scores its contiguous part and `gather_hosts` joins them, so all hosts report the same
    metrics and agree on the best checkpoint. With `examples` (and an eval step made
    `with_reconstructions=True`), "example_image" and "example_reconstruction" also hold up
    to that many of this host's first batch's faces and their reconstructions, kept while
    scoring so the split is read once.
    """
    columns: dict[str, list] = {k: [] for k in ("prob", "recon_error", "label", "frame_index",
                                                "video_id", "method", "dataset")}
    kept = {}
    batches = eval_pipeline.make_eval_iterator(config, mesh, data_dir, split)
    bar = tqdm(batches, desc=f"eval {Path(data_dir).name}/{split}", unit="batch",
               disable=not progress or jax.process_index() != 0, leave=False)
    for batch in bar:
        out = eval_step(state, {"image": batch["image"], "label": batch["label"]})
        meta = batch["meta"]
        keep = meta["mask"]
        if examples and not kept:
            kept = {"example_image": host_rows(batch["image"])[keep][:examples],
                    "example_reconstruction": host_rows(out["reconstruction"])[keep][:examples]}
        columns["prob"].append(host_rows(out["prob"])[keep])
        columns["recon_error"].append(host_rows(out["recon_error"])[keep])
        for name in ("label", "frame_index", "video_id", "method", "dataset"):
            columns[name].append(meta[name][keep])
    return {**gather_hosts({k: np.concatenate(v) for k, v in columns.items()}), **kept}


def gather_hosts(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every host's rows of equal-keyed 1-D columns, concatenated in process order.

    Hosts hold different row counts and string widths, and `process_allgather` needs equal
    shapes: each column travels as zero-padded raw bytes, strings (object arrays) as UTF-8.
    """
    if jax.process_count() == 1:
        return columns
    from jax.experimental.multihost_utils import process_allgather

    counts = process_allgather(np.int32(len(next(iter(columns.values())))))
    gathered = {}
    for name, values in columns.items():
        text = values.dtype == object
        if text:
            values = np.array([str(v).encode() for v in values], dtype=bytes)
            width = int(process_allgather(np.int32(values.dtype.itemsize)).max())
            values = values.astype(f"S{width}")
        size = values.dtype.itemsize
        raw = np.zeros((int(counts.max()), size), np.uint8)
        raw[: len(values)] = np.ascontiguousarray(values).view(np.uint8).reshape(-1, size)
        hosts = process_allgather(raw)
        rows = np.concatenate([hosts[p, :n] for p, n in enumerate(counts)])
        merged = np.ascontiguousarray(rows).reshape(-1).view(values.dtype)
        gathered[name] = np.array([b.decode() for b in merged], dtype=object) if text else merged
    return gathered


def video_keys(scores: dict[str, np.ndarray]) -> list[str]:
    """Full video identity: the same file name under two methods is two videos."""
    return [f"{d}/{m}/{v}" for d, m, v in zip(scores["dataset"], scores["method"],
                                              scores["video_id"], strict=True)]


def summarize(scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """Frame and video metrics for all rows ("all") and per fake method (with all reals)."""
    keys = np.asarray(video_keys(scores), dtype=object)

    def report(rows: np.ndarray) -> dict:
        labels, probs = scores["label"][rows], scores["prob"][rows]
        return {
            "frame": metrics.frame_metrics(labels, probs),
            "video": metrics.video_metrics(keys[rows], labels, probs),
        }

    everything = np.ones(len(keys), bool)
    result = {"all": report(everything)}
    real = scores["label"] == 0
    for method in sorted(set(scores["method"][~real])):
        result[method] = report(real | (scores["method"] == method))
    return result


def save_roc_plot(curves: dict[str, dict], path: epath.Path, title: str) -> None:
    """One ROC curve per entry of `curves` ({name: {"labels", "probs"}}) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, c in curves.items():
        fpr, tpr, _ = metrics.roc_curve(c["labels"], c["probs"])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.auc(c['labels'], c['probs']):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:  # Local or gs://.
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def markdown_table(results: dict[str, dict]) -> str:
    """Cross-dataset table: one row per dataset (all methods) and per method."""
    lines = [
        "| data | subset | frame AUC | frame ACC | frame EER | frame AP | video AUC | video ACC |"
        " frames | videos |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, subsets in results.items():
        for subset, r in subsets.items():
            f, v = r["frame"], r["video"]
            lines.append(
                f"| {data} | {subset} | {f['auc']:.4f} | {f['acc']:.4f} | {f['eer']:.4f} | "
                f"{f['ap']:.4f} | {v['auc']:.4f} | {v['acc']:.4f} | {f['frames']} | "
                f"{v['videos']} |"
            )
    return "\n".join(lines) + "\n"


def data_keys(data_dirs: list[str]) -> dict[str, str]:
    """Result key -> data dir: the dir's name, or where names repeat the shortest path suffix
    that tells it apart (`a/ffpp` and `b/ffpp`), so no dir's results overwrite another's."""
    parts = [Path(d.rstrip("/")).parts for d in data_dirs]
    keys = {}
    for i, (data_dir, mine) in enumerate(zip(data_dirs, parts, strict=True)):
        others = [p for j, p in enumerate(parts) if j != i]
        depth = next((k for k in range(1, len(mine) + 1)
                      if all(p[-k:] != mine[-k:] for p in others)), None)
        if depth is None:
            raise ValueError(f"--data names {data_dir} twice (or as a suffix of another dir)")
        keys["/".join(mine[-depth:])] = data_dir
    return keys


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, data_dirs: list[str], split: str, out: str | os.PathLike,
    *, batch_size: int = 0, protocol: str = "cae-jax",
) -> dict:
    """Scores `checkpoint` on each dir's split; writes metrics JSON, table and ROC PNGs.

    `checkpoint` may also be an `import-weights` output holding a trained detector
    (`--format deepfakebench`), scored as imported. `protocol="deepfakebench"` adds their
    metrics beside their published numbers (cae_jax/deepfakebench.py).
    """
    from cae_jax import checkpoints, deepfakebench, sharding, train_step, weights

    imported = weights.is_import(checkpoint)
    if imported:
        config, step_dir = weights.detector_config(checkpoint), checkpoint
    else:
        config, step_dir = checkpoints.resolve_config_and_step(checkpoint)
    if batch_size:
        config.input.eval_batch_size = batch_size
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    abstract = train_step.abstract_state(config, mesh)
    if imported:
        state = train_step.create_train_state(config, abstract)
    else:
        state = checkpoints.restore_state(step_dir, abstract.shapes)
    eval_step = train_step.make_eval_step(config, abstract)
    results, curves, protocol_rows = {}, {}, []
    keys = data_keys(data_dirs)
    for name, data_dir in keys.items():
        scores = score_split(config, eval_step, state, mesh, data_dir, split)
        results[name] = summarize(scores)
        curves[name] = {"labels": scores["label"], "probs": scores["prob"]}
        if protocol == "deepfakebench":
            protocol_rows.append(deepfakebench.report(scores, video_keys(scores), data_dir))
    report = {"checkpoint": str(step_dir), "step": int(state.step), "split": split,
              "data": keys, "results": results}
    if protocol == "deepfakebench":
        report["deepfakebench"] = protocol_rows
    if jax.process_index() == 0:
        out = checkpoints.as_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        table = {d: {s: {"frame_auc": r["frame"]["auc"], "video_auc": r["video"]["auc"]}
                     for s, r in subsets.items()} for d, subsets in results.items()}
        out.with_name(out.stem + "_table.json").write_text(json.dumps(table, indent=2))
        out.with_name(out.stem + "_table.md").write_text(markdown_table(results))
        if protocol_rows:
            table_md = deepfakebench.markdown_table(protocol_rows)
            out.with_name(out.stem + "_deepfakebench.md").write_text(table_md)
        for name, c in curves.items():
            png = out.with_name(f"{out.stem}_roc_{name.replace('/', '__')}.png")
            save_roc_plot({name: c}, png, f"{name} / {split} (step {report['step']})")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a training workdir (its best checkpoint by validation AUC, else "
                        "its latest) or one step directory WORKDIR/checkpoints/STEP")
    parser.add_argument("--data", required=True,
                        help="comma-separated `cae-jax prepare` output dirs")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--out", required=True,
                        help="metrics JSON; OUT_table.md/.json and OUT_roc_DATA.png go beside "
                        "it (DATA: the dir's name, or a longer path suffix where names repeat)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="global evaluation batch (default: the run's eval batch)")
    parser.add_argument("--protocol", choices=("cae-jax", "deepfakebench"), default="cae-jax",
                        help="deepfakebench: also their metrics beside their published numbers "
                        "(OUT_deepfakebench.md)")


def run(args: argparse.Namespace) -> int:
    from cae_jax import workdir_lock

    if args.batch_size < 0:
        raise SystemExit(f"error: --batch-size {args.batch_size}: must be >= 0 "
                         "(0: the run's eval batch)")
    try:
        workdir_lock.check_can_create(args.out, "--out")
    except workdir_lock.DirectoryError as err:
        raise SystemExit(f"error: {err}") from err
    data_dirs = [d for d in args.data.split(",") if d]
    try:
        report = evaluate_checkpoint(args.checkpoint, data_dirs, args.split, args.out,
                                     batch_size=args.batch_size, protocol=args.protocol)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if jax.process_index() == 0:
        print(markdown_table(report["results"]), end="")
        for key, data_dir in report["data"].items():
            if "/" in key:  # Its name alone is another dir's too.
                print(f"{key}: {data_dir}")
        if "deepfakebench" in report:
            from cae_jax import deepfakebench

            print(deepfakebench.markdown_table(report["deepfakebench"]), end="")
        print(f"wrote {args.out}")
    return 0
