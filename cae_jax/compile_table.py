"""`cae-jax compile-table`: many `cae-jax compile --out` reports as one table and one plot.

One report is one target and one config; choosing a pod means reading them side by side (chips,
precision, mesh, BatchNorm groups) and seeing how the estimated throughput grows with chips.
Images/s are the reports' roofline estimates, marked so in the table and the plot.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from cae_jax import atomic_file

REPORT_FILE = "report.json"


def find_reports(paths: list[str]) -> list[Path]:
    """The report.json files named, or found one level under each directory named."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            found.append(path)
        elif (path / REPORT_FILE).is_file():
            found.append(path / REPORT_FILE)
        elif path.is_dir():
            found += sorted(path.glob(f"*/{REPORT_FILE}"))
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    if not found:
        raise FileNotFoundError(f"{', '.join(paths)}: no {REPORT_FILE} (write them with "
                                "`cae-jax compile ... --out DIR`)")
    return found


def read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(report, dict) or "train step" not in report.get("steps", {}):
        raise ValueError(f"{path}: not a `cae-jax compile` report (no train step)")
    return report


def batchnorm(report: dict[str, Any]) -> str:
    group = report.get("bn_group", 0)  # Reports written before the field: the global batch.
    return {0: "global batch", 1: "per device"}.get(group, f"groups of {group}")


def row(report: dict[str, Any]) -> dict[str, Any]:
    """One table row: the train step of one report. Memory and cost are per device (tpu7x
    has two a chip, the others one), images/s per chip."""
    target, step = report["target"], report["steps"]["train step"]
    name = target["name"] + (f" x{target['slices']} slices" if target["slices"] > 1 else "")
    fields = {
        "target": name,
        "chips": target["chips"] * target["slices"],
        "dtype": report["dtype"],
        "fsdp": report["mesh"]["fsdp"],
        "batchnorm": batchnorm(report),
        "batch_per_chip": report["batch_per_chip"],
        "fits": step["fits"],
        "compile_seconds": step["compile_seconds"],
        "platform": target["platform"],
        "generation": target["name"].rsplit("-", 1)[0],
    }
    if not step["fits"]:
        return fields
    memory = step["memory"]
    fields.update(hbm_gib=memory["total"] / 2**30, hbm_of_gib=step["hbm_per_device"] / 2**30,
                  collectives=step["collectives"])
    if "cost" in step:
        roofline = step["roofline"]
        fields.update(tflop=step["cost"]["flops"] / 1e12, gb=step["cost"]["bytes"] / 1e9,
                      gflop_per_image=step["flops_per_image"] / 1e9, bound=roofline["bound"],
                      per_chip=roofline["images_per_second_per_chip"],
                      total=roofline["images_per_second_total"])
    return fields


def collectives_text(collectives: dict[str, dict[str, int]]) -> str:
    if not collectives:
        return "none"
    return ", ".join(f"{figures['count']} {kind} ({figures['bytes'] / 2**20:.0f} MiB)"
                     for kind, figures in sorted(collectives.items()))


def sort_key(fields: dict[str, Any]) -> tuple:
    return (fields["platform"], fields["generation"], fields["dtype"], fields["fsdp"],
            fields["batchnorm"], fields["chips"])


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["target", "chips", "dtype", "mesh.fsdp", "BatchNorm", "batch per chip",
              "HBM per device (of), GiB", "fits", "TFLOP / GB per device per step",
              "GFLOP per image", "est. images/s per chip", "est. images/s in all",
              "collectives per step", "compile"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for fields in rows:
        cells = [fields["target"], str(fields["chips"]), fields["dtype"], str(fields["fsdp"]),
                 fields["batchnorm"], str(fields["batch_per_chip"])]
        if not fields["fits"]:
            cells += ["-", "**no**"] + ["-"] * 5
        else:
            cells += [f"{fields['hbm_gib']:.2f} ({fields['hbm_of_gib']:.1f})", "yes"]
            if "total" in fields:
                cells += [f"{fields['tflop']:.2f} / {fields['gb']:.0f}",
                          f"{fields['gflop_per_image']:.1f}",
                          f"{fields['per_chip']:,.0f} ({fields['bound']}-bound)",
                          f"{fields['total']:,.0f}"]
            else:
                cells += ["-"] * 4
            cells.append(collectives_text(fields["collectives"]))
        cells.append(f"{fields['compile_seconds']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scaling_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{chip, precision, mesh and BatchNorm choice: [(chips, estimated images/s in all)]} of
    the rows that fit, sorted by chips."""
    series: dict[str, list[tuple[int, float]]] = {}
    for fields in rows:
        if fields["fits"] and "total" in fields:
            label = f"{fields['generation']} {fields['dtype']}"
            if fields["fsdp"] != 1:
                label += f", fsdp {fields['fsdp']}"
            if fields["batchnorm"] != "global batch":
                label += f", BN {fields['batchnorm']}"
            series.setdefault(label, []).append((fields["chips"], fields["total"]))
    return {label: sorted(points) for label, points in sorted(series.items())}


def plot_scaling(rows: list[dict[str, Any]]) -> bytes:
    """`scaling_series` on log-log axes: PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # A color for each of many lines.
    for label, points in scaling_series(rows).items():
        chips, totals = zip(*points, strict=True)
        ax.plot(chips, totals, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chips (GPUs)")
    ax.set_ylabel("images/s in all (estimated: roofline, not measured)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+",
                        help="`cae-jax compile --out` directories, their report.json files, or "
                             "directories holding several")
    parser.add_argument("--out", help="directory for compile_table.md and compile_scaling.png "
                                      "(default: print the table only)")


def run(args: argparse.Namespace) -> int:
    try:
        rows = sorted((row(read_report(path)) for path in find_reports(args.reports)),
                      key=sort_key)
    except (FileNotFoundError, ValueError) as err:
        print(f"cae-jax compile-table: {err}", file=sys.stderr)
        return 2
    markdown = to_markdown(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_file.write_text(out / "compile_table.md", markdown)
        atomic_file.write_bytes(out / "compile_scaling.png", plot_scaling(rows))
    print(markdown, end="")
    return 0
