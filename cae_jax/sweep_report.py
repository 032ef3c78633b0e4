"""One table for a sweep: per run its best validation AUC, the step of it, and test AUC.

Reads DIR/sweep.json and, per run, `metrics.jsonl` (one JSON object per line with `step` and
metric keys, as `cae-jax train` writes), `config.json` (its `train.steps`) and
`test_metrics.json` (`cae-jax evaluate` of the run's best checkpoint on the test split, made by
`cae-jax sweep --test-data`). Writes DIR/report.md, DIR/report.csv and DIR/report.png
(validation curves), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath

from cae_jax import sweep as sweep_lib

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
DEFAULT_VAL_METRIC = "val_auc"


def read_metrics(path: epath.Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; [] when it does not exist yet.

    A last line without its newline is a record still being written and is left for the next
    report; any other unreadable line is an error naming the file and line.
    """
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: "" or being written.
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from err
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number}: a metrics line needs a 'step' key")
        records.append(record)
    return records


def read_test_aucs(path: epath.Path) -> dict[str, float]:
    """Frame AUC per test dataset from a `cae-jax evaluate` report ({} when absent).

    One dataset gives column `test_auc`; several give `test_auc/<dataset>` each.
    """
    if not path.exists():
        return {}
    try:
        results = json.loads(path.read_text())["results"]
        aucs = {name: result["all"]["frame"]["auc"] for name, result in results.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a cae-jax evaluate report ({err})") from err
    if len(aucs) == 1:
        return {"test_auc": next(iter(aucs.values()))}
    return {f"test_auc/{name}": auc for name, auc in aucs.items()}


def planned_steps(path: epath.Path) -> int | None:
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["train"]["steps"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: no train.steps ({err})") from err


def summarize_run(run: sweep_lib.Run, val_metric: str) -> dict[str, Any]:
    """The report row of one run (metrics missing so far are None)."""
    workdir = epath.Path(run.workdir)
    records = read_metrics(workdir / METRICS_FILE)
    tests = read_test_aucs(workdir / sweep_lib.TEST_METRICS_FILE)
    steps = planned_steps(workdir / CONFIG_FILE)
    scored = [r for r in records if _is_number(r.get(val_metric))]
    best = max(scored, key=lambda r: (r[val_metric], -r["step"]), default=None)
    last_step = max((r["step"] for r in records), default=None)
    if tests:
        status = "tested"
    elif last_step is not None and steps is not None and last_step >= steps:
        status = "trained"
    elif records:
        status = "running"
    else:
        status = "not started"
    return {
        "index": run.index,
        "name": run.name,
        **run.overrides,
        "status": status,
        "last_step": last_step,
        f"best_{val_metric}": best[val_metric] if best else None,
        "best_step": best["step"] if best else None,
        **tests,
        "_curve": [(r["step"], r[val_metric]) for r in scored],
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_rows(workdir: str, val_metric: str) -> list[dict[str, Any]]:
    """Rows of every run, the best validation first (runs without one last, by index)."""
    rows = [summarize_run(r, val_metric) for r in sweep_lib.read_runs(workdir)]
    best_key = f"best_{val_metric}"
    return sorted(rows, key=lambda r: (r[best_key] is None, -(r[best_key] or 0.0), r["index"]))


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update((key, None) for key in row if not key.startswith("_"))
    return list(seen)


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    header = columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key in header) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=columns(rows), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: "" if v is None else v for k, v in row.items() if not k.startswith("_")}
        )
    return out.getvalue()


def plot_curves(rows: Sequence[dict[str, Any]], val_metric: str, path: epath.Path) -> None:
    """Validation metric against step, one line per run, so divergence shows at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row["_curve"]:
            steps, values = zip(*row["_curve"], strict=True)
            ax.plot(steps, values, marker=".", label=row["name"])
    ax.set_xlabel("step")
    ax.set_ylabel(val_metric)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workdir", help="sweep directory written by `cae-jax sweep`")
    parser.add_argument("--val-metric", default=DEFAULT_VAL_METRIC, help="metric to rank runs by")
    parser.add_argument("--out", help="directory for report.md/.csv/.png (default: the sweep's)")


def run(args: argparse.Namespace) -> int:
    try:
        rows = build_rows(args.workdir, args.val_metric)
    except (FileNotFoundError, ValueError) as err:
        print(f"cae-jax sweep-report: {err}", file=sys.stderr)
        return 2
    out = epath.Path(args.out or args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(to_csv(rows))
    plot_curves(rows, args.val_metric, out / "report.png")
    print(markdown, end="")
    print(f"wrote {out}/report.md, report.csv, report.png", file=sys.stderr)
    return 0
