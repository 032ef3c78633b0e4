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
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from cae_jax import (
    bootstrap,
    deepfakebench,
    eval_pipeline,
    eval_tables,
    metrics,
    perturb,
    scores_file,
)


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
    perturbation: perturb.Perturbation | None = None,
) -> dict[str, np.ndarray]:
    """Every record of a split scored once: prob, recon_error, label and metadata arrays.

    Rows are the whole split's, in record order, on every host (padding dropped): each host
    scores its contiguous part and `gather_hosts` joins them, so all hosts report the same
    metrics and agree on the best checkpoint. With `examples` (and an eval step made
    `with_reconstructions=True`), "example_image" and "example_reconstruction" also hold up
    to that many of this host's first batch's faces and their reconstructions, kept while
    scoring so the split is read once. With `perturbation`, every crop is perturbed first.
    """
    columns: dict[str, list] = {k: [] for k in ("prob", "recon_error", "label", "frame_index",
                                                "video_id", "method", "dataset")}
    kept = {}
    batches = eval_pipeline.make_eval_iterator(config, mesh, data_dir, split,
                                               perturbation=perturbation)
    what = f"{Path(data_dir).name}/{split}" + (f" {perturbation.name}" if perturbation else "")
    bar = tqdm(batches, desc=f"eval {what}", unit="batch",
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


def _rows(scores: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in scores.items()}


def metrics_of(labels: np.ndarray, probs: np.ndarray, keys: Sequence[str], *, resamples: int = 0,
               seed: int = bootstrap.SEED) -> dict:
    """Frame and video metrics of rows (`keys`: their videos); with `resamples`, each AUC's
    bootstrap interval over videos ("auc_ci")."""
    out = {"frame": metrics.frame_metrics(labels, probs),
           "video": metrics.video_metrics(keys, labels, probs)}
    if resamples:
        intervals = bootstrap.frame_and_video_intervals(keys, labels, probs,
                                                        resamples=resamples, seed=seed)
        for level, ci in intervals.items():
            out[level]["auc_ci"] = ci
    return out


def summarize(scores: dict[str, np.ndarray], *, resamples: int = 0,
              seed: int = bootstrap.SEED) -> dict[str, dict]:
    """`metrics_of` all rows ("all") and of each fake method's rows with all reals."""
    keys = np.asarray(video_keys(scores), dtype=object)

    def report(rows: np.ndarray) -> dict:
        return metrics_of(scores["label"][rows], scores["prob"][rows], keys[rows],
                          resamples=resamples, seed=seed)

    everything = np.ones(len(keys), bool)
    result = {"all": report(everything)}
    real = scores["label"] == 0
    for method in sorted(set(scores["method"][~real])):
        result[method] = report(real | (scores["method"] == method))
    return result


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



def labelled(scores: dict[str, np.ndarray], data: str, split: str,
             perturbation: str = "") -> dict[str, np.ndarray]:
    """`score_split`'s columns as a scores-file table (scores_file.COLUMNS)."""
    rows = len(scores["label"])
    extra = {"data": np.full(rows, data, object), "split": np.full(rows, split, object),
             "perturbation": np.full(rows, perturbation, object)}
    return scores_file.typed({**scores, **extra})


def build_report(scores: dict[str, np.ndarray], split: str, val_split: str | None, *,
                 protocol_names: dict[str, str] | None = None,
                 resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> dict:
    """Every number of a report from a scores table (`labelled` rows; a scores file).

    Test rows: `split`, unperturbed, one result per `data` key in order of appearance.
    Validation rows (`val_split`): the operating points' thresholds, applied to each test
    set. Perturbed test rows: the robustness rows after the unperturbed one.
    `protocol_names` ({data key: their test-set name}) adds DeepfakeBench's table.
    """
    is_split = scores["split"] == split
    clean = scores["perturbation"] == ""
    test = _rows(scores, is_split & clean)
    if not test["label"].size:
        raise ValueError(f"no unperturbed rows of split {split!r} to evaluate")
    report: dict = {"split": split, "results": {}, "bootstrap": {"resamples": resamples,
                                                                 "seed": seed}}
    sets = {data: _rows(test, test["data"] == data) for data in dict.fromkeys(test["data"])}
    for data, rows in sets.items():
        report["results"][data] = summarize(rows, resamples=resamples, seed=seed)
    if protocol_names is not None:
        report["deepfakebench"] = [  # The intervals of the same rows, as in "results".
            deepfakebench.report(rows, video_keys(rows), protocol_names[data],
                                 {level: report["results"][data]["all"][level].get("auc_ci")
                                  for level in ("frame", "video")})
            for data, rows in sets.items()]
    validation = _rows(scores, (scores["split"] == val_split) & clean) if val_split else None
    if validation is not None and validation["label"].size:
        report["operating_points"] = operating_points(validation, sets)
    report["calibration"] = {data: calibration(rows) for data, rows in sets.items()}
    perturbed = _rows(scores, is_split & ~clean)
    if perturbed["label"].size:
        report["robustness"] = {}
        for data in sets:
            rows = [robustness_row("none", report["results"][data]["all"])]
            for name in dict.fromkeys(perturbed["perturbation"]):
                mine = _rows(perturbed, (perturbed["data"] == data)
                             & (perturbed["perturbation"] == name))
                rows.append(robustness_row(name, metrics_of(
                    mine["label"], mine["prob"], video_keys(mine), resamples=resamples,
                    seed=seed)))
            report["robustness"][data] = rows
    return report


def operating_points(validation: dict[str, np.ndarray], sets: dict[str, dict]) -> dict:
    """Thresholds picked on the validation rows, applied to each test set (never picked on
    it); beside them the test set's own EER, for reference."""
    thresholds = metrics.operating_points(validation["label"], validation["prob"])
    test = {}
    for data, rows in sets.items():
        test[data] = {name: {"threshold": t, **metrics.rates_at(rows["label"], rows["prob"], t)}
                      for name, t in thresholds.items()}
        test[data]["test_eer"] = metrics.eer(rows["label"], rows["prob"])
    names = sorted(set(validation["data"]))
    return {"validation": {"data": ",".join(names), "split": str(validation["split"][0]),
                           "frames": int(validation["label"].size), "thresholds": thresholds},
            "test": test}


def calibration(rows: dict[str, np.ndarray]) -> dict:
    bins = metrics.reliability(rows["label"], rows["prob"])
    return {"ece": metrics.expected_calibration_error(rows["label"], rows["prob"]),
            **{name: np.asarray(values).tolist() for name, values in bins.items()}}


def robustness_row(name: str, summary: dict) -> dict:
    """One perturbation's (or "none"'s) frame and video AUC with intervals (`metrics_of`)."""
    return {"perturbation": name,
            **{f"{level}_{field}": summary[level].get(field) for level in ("frame", "video")
               for field in ("auc", "auc_ci")}}


def write_report(report: dict, scores: dict[str, np.ndarray], out: str | os.PathLike) -> None:
    """OUT (JSON), OUT_table.json/.md (the cross-dataset table), OUT_report.md (every table),
    OUT_deepfakebench.md, and per test set
    OUT_roc_DATA.png, OUT_reliability_DATA.png, OUT_robustness_DATA.png."""
    from cae_jax import checkpoints

    out = checkpoints.as_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    results = report["results"]
    table = {d: {s: {"frame_auc": r["frame"]["auc"], "video_auc": r["video"]["auc"],
                     "frame_auc_ci": r["frame"].get("auc_ci"),
                     "video_auc_ci": r["video"].get("auc_ci")}
                 for s, r in subsets.items()} for d, subsets in results.items()}
    out.with_name(out.stem + "_table.json").write_text(json.dumps(table, indent=2))
    out.with_name(out.stem + "_table.md").write_text(eval_tables.markdown_table(results))
    out.with_name(out.stem + "_report.md").write_text(eval_tables.report_markdown(report))
    if "deepfakebench" in report:
        table_md = deepfakebench.markdown_table(report["deepfakebench"])
        out.with_name(out.stem + "_deepfakebench.md").write_text(table_md)
    test = (scores["split"] == report["split"]) & (scores["perturbation"] == "")
    title = f"/ {report['split']}" + (f" (step {report['step']})" if "step" in report else "")
    for data in results:
        rows = test & (scores["data"] == data)
        stem = f"{out.stem}_{{}}_{data.replace('/', '__')}.png"
        eval_tables.save_roc_plot({data: {"labels": scores["label"][rows],
                                          "probs": scores["prob"][rows]}},
                                  out.with_name(stem.format("roc")), f"{data} {title}")
        eval_tables.save_reliability_plot(report["calibration"][data],
                                          out.with_name(stem.format("reliability")),
                                          f"{data} {title}")
        if "robustness" in report:
            eval_tables.save_robustness_plot(report["robustness"][data],
                                             out.with_name(stem.format("robustness")),
                                             f"{data} {title}")


def validation_source(config: ConfigDict, val_data: str | None, val_split: str | None,
                      split: str) -> tuple[str, str] | None:
    """(dir, split) whose scores pick the operating points: `--val-data` / `--val-split`,
    else the checkpoint's own validation (input.eval_dir or its first train dir, at
    input.eval_split). None, with a printed note, for "none" and where the checkpoint's own
    is unreadable or is the evaluated split itself; a named one that is so is an error."""
    from cae_jax import config as config_lib
    from cae_jax import prepared_data

    if val_data == "none":
        return None
    named = bool(val_data or val_split)
    data_dir = val_data or config_lib.eval_data_dir(config)
    val_split = val_split or config.input.eval_split
    problem = None
    if val_split == split:
        problem = f"validation split {val_split} is the evaluated split"
    else:
        try:
            prepared_data.split_shards(data_dir, val_split)
        except (FileNotFoundError, ValueError) as err:
            problem = str(err)
    if problem and named:
        raise ValueError(f"--val-data/--val-split: {problem}")
    if problem:
        if jax.process_index() == 0:
            print(f"evaluate: no operating points: the checkpoint's validation data "
                  f"({data_dir or 'none'}, split {val_split}): {problem}; pass --val-data "
                  "DIR / --val-split NAME")
        return None
    return data_dir, val_split


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, data_dirs: list[str], split: str, out: str | os.PathLike,
    *, batch_size: int = 0, protocol: str = "cae-jax", val_data: str | None = None,
    val_split: str | None = None, perturbations: list[perturb.Perturbation] = (),
    scores_out: str | os.PathLike | None = None, resamples: int = bootstrap.RESAMPLES,
    seed: int = bootstrap.SEED,
) -> dict:
    """Scores `checkpoint` on each dir's split (and each perturbation of it) and on the
    validation data; writes the report (`write_report`) and optionally the scores file.

    `checkpoint` may also be an `import-weights` output holding a trained detector
    (`--format deepfakebench`), scored as imported. `protocol="deepfakebench"` adds their
    metrics beside their published numbers (cae_jax/deepfakebench.py).
    """
    from cae_jax import checkpoints, sharding, train_step, weights

    keys = data_keys(data_dirs)
    imported = weights.is_import(checkpoint)
    if imported:
        config, step_dir = weights.detector_config(checkpoint), checkpoint
    else:
        config, step_dir = checkpoints.resolve_config_and_step(checkpoint)
    if batch_size:
        config.input.eval_batch_size = batch_size
    validation = validation_source(config, val_data, val_split, split)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    abstract = train_step.abstract_state(config, mesh)
    if imported:
        state = train_step.create_train_state(config, abstract)
    else:
        state = checkpoints.restore_state(step_dir, abstract.shapes)
    eval_step = train_step.make_eval_step(config, abstract)

    def score(data_dir: str, data: str, split: str, p: perturb.Perturbation | None = None):
        rows = score_split(config, eval_step, state, mesh, data_dir, split, perturbation=p)
        return labelled(rows, data, split, p.name if p else "")

    tables = []
    for name, data_dir in keys.items():
        tables.append(score(data_dir, name, split))
        tables += [score(data_dir, name, split, p) for p in perturbations]
    if validation:
        tables.append(score(validation[0], Path(validation[0].rstrip("/")).name, validation[1]))
    scores = scores_file.concatenate(tables)
    names = ({key: deepfakebench.dataset_name(d) for key, d in keys.items()}
             if protocol == "deepfakebench" else None)
    report = {"checkpoint": str(step_dir), "step": int(state.step), "data": keys,
              **build_report(scores, split, validation and validation[1],
                             protocol_names=names, resamples=resamples, seed=seed)}
    if jax.process_index() == 0:
        if scores_out:
            scores_file.write(scores_out, scores)
        write_report(report, scores, out)
    return report


def evaluate_scores(path: str, split: str, val_split: str | None, out: str | os.PathLike, *,
                    protocol: str = "cae-jax", resamples: int = bootstrap.RESAMPLES,
                    seed: int = bootstrap.SEED) -> dict:
    """`--from-scores`: every table of `evaluate_checkpoint` from its scores file, no model.
    Thresholds come from the `val_split` rows (default "validation", unless that is the
    evaluated split); DeepfakeBench's table names each test set by its data key (no data dir
    to read)."""
    scores = scores_file.read(path)
    if val_split == split:
        raise ValueError(f"--val-split {split} is the evaluated split: thresholds must be "
                         "picked on other data")
    if val_split is None:
        val_split = "validation" if split != "validation" else None
    if not (scores["split"] == split).any():
        raise ValueError(f"{path}: no rows of split {split!r} (has "
                         f"{', '.join(sorted(set(scores['split'])))}; --split)")
    data = dict.fromkeys(scores["data"][scores["split"] == split])
    names = {key: key for key in data} if protocol == "deepfakebench" else None
    report = {"scores": str(path), **build_report(scores, split, val_split,
                                                  protocol_names=names, resamples=resamples,
                                                  seed=seed)}
    write_report(report, scores, out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="a training workdir (its best checkpoint by validation AUC, else "
                        "its latest) or one step directory WORKDIR/checkpoints/STEP")
    source.add_argument("--from-scores", metavar="FILE",
                        help="recompute every table from a --scores-out file, without the model")
    parser.add_argument("--data", help="comma-separated `cae-jax prepare` output dirs "
                        "(with --checkpoint)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--out", required=True,
                        help="metrics JSON; OUT_table.md/.json, OUT_report.md, OUT_roc_DATA.png, "
                        "OUT_reliability_DATA.png (and OUT_robustness_DATA.png) go beside it "
                        "(DATA: the dir's name, or a longer path suffix where names repeat)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="global evaluation batch (default: the run's eval batch)")
    parser.add_argument("--protocol", choices=("cae-jax", "deepfakebench"), default="cae-jax",
                        help="deepfakebench: also their metrics beside their published numbers "
                        "(OUT_deepfakebench.md)")
    parser.add_argument("--scores-out", metavar="FILE",
                        help="also write every scored face (test, perturbed, validation) to "
                        "FILE (.parquet or .csv)")
    parser.add_argument("--val-data", metavar="DIR",
                        help="prepared dir whose --val-split picks the operating-point "
                        "thresholds (default: the checkpoint's validation data; none: skip)")
    parser.add_argument("--val-split", default=None,
                        help="its split (default: the checkpoint's input.eval_split; with "
                        "--from-scores: validation)")
    parser.add_argument("--perturb", action="append", default=[], metavar="KIND:S1,S2",
                        help="re-score the test faces perturbed: jpeg:QUALITY,...  "
                        "resize:FACTOR,...  blur:KERNEL,...  noise:SIGMA,... (repeatable)")
    parser.add_argument("--bootstrap", type=int, default=bootstrap.RESAMPLES,
                        help="resamples of videos for the AUC intervals (0: none; default "
                        f"{bootstrap.RESAMPLES})")
    parser.add_argument("--seed", type=int, default=bootstrap.SEED,
                        help="seed of the bootstrap resamples")


def run(args: argparse.Namespace) -> int:
    from cae_jax import dir_lock

    if args.batch_size < 0:
        raise SystemExit(f"error: --batch-size {args.batch_size}: must be >= 0 "
                         "(0: the run's eval batch)")
    try:
        dir_lock.check_can_create(args.out, "--out")
    except dir_lock.DirectoryError as err:
        raise SystemExit(f"error: {err}") from err
    try:
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        if args.from_scores:
            if args.data or args.perturb or args.val_data or args.scores_out:
                raise ValueError("--from-scores takes no --data, --perturb, --val-data or "
                                 "--scores-out: the file holds the scores")
            report = evaluate_scores(args.from_scores, args.split, args.val_split, args.out,
                                     protocol=args.protocol, resamples=args.bootstrap,
                                     seed=args.seed)
        else:
            if not args.data:
                raise ValueError("--checkpoint needs --data")
            if args.scores_out:
                scores_file.check_path(args.scores_out)
            perturbations = perturb.parse(args.perturb)
            data_dirs = [d for d in args.data.split(",") if d]
            report = evaluate_checkpoint(
                args.checkpoint, data_dirs, args.split, args.out, batch_size=args.batch_size,
                protocol=args.protocol, val_data=args.val_data, val_split=args.val_split,
                perturbations=perturbations, scores_out=args.scores_out,
                resamples=args.bootstrap, seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if jax.process_index() == 0:
        print(eval_tables.report_markdown(report), end="")
        for key, data_dir in report.get("data", {}).items():
            if "/" in key:  # Its name alone is another dir's too.
                print(f"{key}: {data_dir}")
        if "deepfakebench" in report:
            print(deepfakebench.markdown_table(report["deepfakebench"]), end="")
        print(f"wrote {args.out}" + (f" and {args.scores_out}" if args.scores_out else ""))
    return 0
