"""What `cae-jax evaluate` shows of a report: markdown tables and PNG plots.

Tables read the report dict `evaluate.build_report` makes (so `--from-scores` prints the same
ones); plots take the scores they draw. Intervals print as [low, high] beside their value.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from cae_jax import metrics


def interval_text(interval) -> str:
    """[low, high] of a bootstrap interval; "-" where none was computed."""
    return "-" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def markdown_table(results: dict[str, dict]) -> str:
    """Cross-dataset table: one row per dataset (all methods) and per method."""
    lines = [
        "| data | subset | frame AUC | 95% CI | frame ACC | frame EER | frame AP | video AUC |"
        " 95% CI | video ACC | frames | videos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, subsets in results.items():
        for subset, r in subsets.items():
            f, v = r["frame"], r["video"]
            lines.append(
                f"| {data} | {subset} | {f['auc']:.4f} | {interval_text(f.get('auc_ci'))} | "
                f"{f['acc']:.4f} | {f['eer']:.4f} | {f['ap']:.4f} | {v['auc']:.4f} | "
                f"{interval_text(v.get('auc_ci'))} | {v['acc']:.4f} | {f['frames']} | "
                f"{v['videos']} |"
            )
    return "\n".join(lines) + "\n"


def operating_points_table(points: dict) -> str:
    """Thresholds from validation, and TPR / FPR / balanced accuracy at them on each test set."""
    lines = [
        f"Thresholds chosen on {points['validation']['data']}/{points['validation']['split']} "
        f"({points['validation']['frames']} frames), applied to each test set:",
        "",
        "| data | point | threshold | TPR | FPR | balanced ACC | test set's own EER |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, at in points["test"].items():
        for name, threshold in points["validation"]["thresholds"].items():
            r = at[name]
            lines.append(f"| {data} | {name} | {threshold:.6g} | {r['tpr']:.4f} | "
                         f"{r['fpr']:.4f} | {r['balanced_acc']:.4f} | {at['test_eer']:.4f} |")
    return "\n".join(lines) + "\n"


def calibration_table(calibration: dict) -> str:
    lines = ["| data | expected calibration error | bins |", "|---|---|---|"]
    lines += [f"| {data} | {c['ece']:.4f} | {len(c['count'])} |"
              for data, c in calibration.items()]
    return "\n".join(lines) + "\n"


def robustness_table(robustness: dict) -> str:
    lines = ["| data | perturbation | frame AUC | 95% CI | video AUC | 95% CI |",
             "|---|---|---|---|---|---|"]
    for data, rows in robustness.items():
        lines += [f"| {data} | {r['perturbation']} | {r['frame_auc']:.4f} | "
                  f"{interval_text(r['frame_auc_ci'])} | {r['video_auc']:.4f} | "
                  f"{interval_text(r['video_auc_ci'])} |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def report_markdown(report: dict) -> str:
    """Every table of a report, in the order evaluate prints them."""
    parts = [markdown_table(report["results"])]
    if report.get("operating_points"):
        parts.append(operating_points_table(report["operating_points"]))
    if report.get("calibration"):
        parts.append(calibration_table(report["calibration"]))
    if report.get("robustness"):
        parts.append(robustness_table(report["robustness"]))
    return "\n".join(parts)


def _figure(size=(5, 5)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=size)


def _save(plt, fig, path: epath.Path) -> None:
    fig.tight_layout()
    with path.open("wb") as f:  # Local or gs://.
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def save_roc_plot(curves: dict[str, dict], path: epath.Path, title: str) -> None:
    """One ROC curve per entry of `curves` ({name: {"labels", "probs"}}) in one PNG."""
    plt, fig, ax = _figure()
    for name, c in curves.items():
        fpr, tpr, _ = metrics.roc_curve(c["labels"], c["probs"])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.auc(c['labels'], c['probs']):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    _save(plt, fig, path)


def save_reliability_plot(calibration: dict, path: epath.Path, title: str) -> None:
    """Fraction fake against mean probability per bin; the diagonal is perfect calibration."""
    plt, fig, ax = _figure()
    bins = len(calibration["count"])
    centers = (np.arange(bins) + 0.5) / bins
    used = np.asarray(calibration["count"]) > 0
    ax.bar(centers[used], np.asarray(calibration["fraction_fake"], float)[used], width=1 / bins,
           edgecolor="k", alpha=0.6, label="fraction fake")
    ax.plot(np.asarray(calibration["mean_prob"], float)[used],
            np.asarray(calibration["fraction_fake"], float)[used], "o", ms=3,
            label="at mean probability")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability fake",
           ylabel="fraction fake", title=f"{title} (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    _save(plt, fig, path)


def save_robustness_plot(rows: list[dict], path: epath.Path, title: str) -> None:
    """Frame AUC with its interval per severity, one line per perturbation kind, each starting
    at the unperturbed AUC."""
    plt, fig, ax = _figure((6, 4))
    clean = rows[0]
    kinds = dict.fromkeys(r["perturbation"].split(":")[0] for r in rows[1:])
    for kind in kinds:
        mine = [clean] + [r for r in rows[1:] if r["perturbation"].split(":")[0] == kind]
        x = np.arange(len(mine))
        auc = np.array([r["frame_auc"] for r in mine])
        ci = np.array([r["frame_auc_ci"] or [np.nan, np.nan] for r in mine], float)
        ax.errorbar(x, auc, yerr=np.abs(ci.T - auc), marker="o", capsize=3, label=kind)
        for xi, r in zip(x[1:], mine[1:], strict=True):
            ax.annotate(r["perturbation"].split(":")[1], (xi, r["frame_auc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="severity step (0: none)", ylabel="frame AUC", title=title)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
