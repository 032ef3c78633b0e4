"""Trainer: SIGKILL + restart equals an uninterrupted run; NaN policies; train then evaluate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cae_jax import checkpoints, main, sharding, train, train_step
from cae_jax.config import load_config
from tests import datasets

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


def overrides(data_dir: Path) -> list[str]:
    return [
        f"--config.input.train_dirs=('{data_dir}',)",
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=4",
        "--config.train.eval_every=6",
        "--config.train.log_every=2",
    ]


def config_for(data_dir: Path, **train_fields):
    config = load_config(ROOT / "configs" / "tiny.py", overrides(data_dir))
    config.train.update(train_fields)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return datasets.write(root / "toy", {"train": (16, 16), "validation": (8, 8), "test": (8, 8)})


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: (workdir, final metrics)."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train(config_for(data_dir), workdir)


def arrays(workdir: Path, step: int):
    _, params, stats, _ = checkpoints.restore_inference(workdir / "checkpoints" / str(step))
    return [np.asarray(x) for x in jax.tree.leaves((params, stats))]


def validation_records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_auc" in r]


def test_resume_after_sigkill_equals_uninterrupted_run(reference, data_dir, tmp_path):
    ref_dir, ref_final = reference
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "cae_jax.main", "train", "--config",
               str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir), *overrides(data_dir)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_dir = workdir / "checkpoints" / "4"
    deadline = time.time() + 600
    while not step_dir.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert step_dir.is_dir(), "the run died before its first checkpoint"
    killed_at = max(int(p.name) for p in step_dir.parent.iterdir() if p.name.isdigit())
    assert killed_at < STEPS, "the run finished before it could be killed"

    final = train.train(config_for(data_dir), workdir)

    for got, want in zip(arrays(workdir, STEPS), arrays(ref_dir, STEPS), strict=True):
        np.testing.assert_array_equal(got, want)
    for key in ("val_auc", "val_eer", "val_ap", "val_recon_error", "loss", "bce", "recon"):
        assert final[key] == ref_final[key], key
    assert validation_records(workdir)[-1] == validation_records(ref_dir)[-1]


def test_best_checkpoint_is_chosen_by_validation_auc(reference):
    ref_dir, _ = reference
    records = validation_records(ref_dir)
    assert [r["step"] for r in records] == [6, 12]
    best = max(records, key=lambda r: (r["val_auc"], -r["step"]))
    assert checkpoints.restore_inference(ref_dir)[3] == best["step"]


def test_train_then_evaluate_cli(reference, data_dir, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "eval" / "metrics.json"
    step_dir = ref_dir / "checkpoints" / str(STEPS)
    assert main.main(["evaluate", "--checkpoint", str(step_dir), "--data", str(data_dir),
                      "--split", "validation", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["results"][data_dir.name]
    # The trainer's last validation scored the same checkpoint on the same split.
    last = validation_records(ref_dir)[-1]
    assert result["all"]["frame"]["auc"] == pytest.approx(last["val_auc"], abs=1e-12)
    assert result["all"]["video"]["auc"] == pytest.approx(last["val_video_auc"], abs=1e-12)
    assert result["all"]["frame"]["frames"] == 16
    assert set(result) == {"all", "Deepfakes"}
    assert (out.parent / "metrics_table.md").read_text().count("| toy |") == 2
    assert (out.parent / "metrics_roc_toy.png").stat().st_size > 1000


def test_nan_loss_stops_or_skips_per_policy(data_dir, tmp_path):
    config = config_for(data_dir, steps=3, eval_every=100, checkpoint_every=1, log_every=1)
    config.loss.recon_weight = float("nan")
    with pytest.raises(train.NonFiniteLossError, match="nan_policy=skip"):
        train.train(config, tmp_path / "stop")
    assert not [p for p in (tmp_path / "stop" / "checkpoints").iterdir() if p.name.isdigit()]

    config.train.nan_policy = "skip"
    final = train.train(config, tmp_path / "skip")
    assert final["skipped_steps"] == 1.0  # The last log window held one (skipped) step.
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    initial = train_step.create_train_state(config, mesh)
    for got, want in zip(arrays(tmp_path / "skip", 3),
                         [np.asarray(x) for x in jax.tree.leaves((initial.params,
                                                                  initial.batch_stats))],
                         strict=True):
        np.testing.assert_array_equal(got, want)
