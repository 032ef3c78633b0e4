"""Work written by the previous release keeps working after `default_config` gains fields:
its workdir resumes, evaluates and exports, its bundle predicts (tests/fixtures/previous_release,
made by commit eeca69b; its README says how)."""

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cae_jax import checkpoints, main, scores_file, serving
from cae_jax import config as config_lib
from tests import datasets

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "previous_release"
ROOT = FIXTURE.parents[2]
SAVED_OVERRIDES = json.loads((FIXTURE / "workdir" / "config.json").read_text())
# What the fixture's checkpoint and bundle computed with the release before the model took
# uint8 images (`release_scores`; written by running this file as a script at that commit).
SCORES = FIXTURE / "scores.json"
STEP_METRICS = ("loss", "bce", "recon", "grad_norm")


@pytest.fixture
def newer_release(monkeypatch):
    """Today's code plus a field in `model` and one in `train`, each with a rule, as a
    release after this one would add them."""
    previous = config_lib.default_config

    def default_config():
        config = previous()
        config.model.later_field = 3
        config.train.later_field = "on"
        return config

    monkeypatch.setattr(config_lib, "default_config", default_config)
    monkeypatch.setattr(config_lib, "RULES", config_lib.RULES + (
        ("model.later_field", config_lib._integer(1)),
        ("train.later_field", config_lib._one_of("on", "off"))))


def copy_workdir(root: Path) -> None:
    """The old workdir beside the prepared data its config.json names ("data"), in `root`."""
    datasets.write(root / "data", {"train": (4, 4), "validation": (4, 4)}, num_shards=1)
    shutil.copytree(FIXTURE / "workdir", root / "workdir")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    copy_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def model_overrides() -> list[str]:
    """The fixture's model and train fields as --config overrides of configs/tiny.py."""
    saved = SAVED_OVERRIDES
    encoder = saved["model"]["encoder"]
    items = [f"--config.model.encoder.{k}={tuple(v) if isinstance(v, list) else v}"
             for k, v in encoder.items()]
    items += [f"--config.model.decoder.features={tuple(saved['model']['decoder']['features'])}",
              "--config.model.classifier.hidden=()", "--config.input.train_dirs=('data',)"]
    items += [f"--config.train.{k}={saved['train'][k]}"
              for k in ("batch_size", "eval_every", "checkpoint_every", "log_every",
                        "recon_images")]
    return items


def test_old_workdir_resumes_with_new_fields_at_their_defaults(newer_release, run_dir, caplog):
    caplog.set_level(logging.WARNING)
    assert main.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                      "workdir", *model_overrides(), "--config.train.steps=4"]) == 0
    assert sorted(int(p.name) for p in (run_dir / "workdir" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4]
    # Named with the fields this release added since the fixture was written.
    [added] = re.findall(r"written before fields (.*) existed", caplog.text)
    assert {"model.later_field", "train.later_field"} <= set(added.split(", "))
    saved = checkpoints.read_config(run_dir / "workdir")
    assert (saved.model.later_field, saved.train.later_field) == (3, "on")


def test_old_workdir_evaluates_and_exports(newer_release, run_dir):
    out = run_dir / "eval" / "metrics.json"
    assert main.main(["evaluate", "--checkpoint", "workdir", "--data", "data",
                      "--split", "validation", "--out", str(out), "--batch-size", "8"]) == 0
    assert json.loads(out.read_text())["results"]["data"]["all"]["frame"]["frames"] == 8
    assert main.main(["export", "--workdir", "workdir", "--out", "bundle", "--formats="]) == 0
    assert json.loads((run_dir / "bundle" / "model.json").read_text())["model"]["later_field"] == 3


def test_old_bundle_predicts(newer_release, tmp_path, capsys):
    predictor = serving.load_bundle(FIXTURE / "bundle")
    assert predictor.meta["model"]["later_field"] == 3
    faces = datasets.face_crop(0)[None]
    assert predictor.predict_proba(faces).shape == (1,)
    image = tmp_path / "face.png"
    import cv2
    cv2.imwrite(str(image), datasets.face_crop(0)[..., ::-1])
    capsys.readouterr()
    assert main.main(["predict", "--model", str(FIXTURE / "bundle"), "--no-detect",
                      str(image)]) == 0
    header, *results = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert header["decision"].startswith("0.5 (uncalibrated")  # The old bundle has none.
    assert [r["status"] for r in results] == ["ok"]


def release_scores() -> dict[str, list[float]]:
    """Numbers the fixture's work gives, from the current directory (as `run_dir` makes it):
    evaluate's per-face scores of the old checkpoint, the metrics of two train steps resumed
    from it (with its validation), and the old bundle's outputs for four face crops."""
    assert main.main(["evaluate", "--checkpoint", "workdir/checkpoints/2", "--data", "data",
                      "--split", "validation", "--out", "eval/metrics.json",
                      "--scores-out", "eval/scores.csv", "--batch-size", "8"]) == 0
    rows = scores_file.read("eval/scores.csv")
    assert main.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                      "workdir", *model_overrides(), "--config.train.steps=4"]) == 0
    records = [json.loads(line) for line in Path("workdir/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 2 and "loss" in r]
    validation = next(r for r in records if r["step"] == 4 and "val_auc" in r)
    outputs = serving.load_bundle(FIXTURE / "bundle").reconstruct(
        np.stack([datasets.face_crop(i) for i in range(4)]))
    return {
        "eval_prob": rows["prob"].tolist(),
        "eval_recon_error": rows["recon_error"].tolist(),
        **{f"train_{name}": [r[name] for r in steps] for name in STEP_METRICS},
        "val_recon_error": [validation["val_recon_error"]],
        "bundle_probability": outputs["probability"].tolist(),
        "bundle_reconstruction_mean": outputs["reconstruction"].mean(axis=(1, 2, 3)).tolist(),
        "bundle_error_mean": outputs["error_map"].mean(axis=(1, 2)).tolist(),
    }


def test_old_work_gives_the_scores_it_gave(run_dir):
    """The previous release's checkpoint and bundle score, train and reconstruct as they did
    then, up to float32 rounding (where XLA now fuses the input's normalization)."""
    expected = json.loads(SCORES.read_text())
    got = release_scores()
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-5, atol=1e-6, err_msg=name)


if __name__ == "__main__":  # Rewrites SCORES with this checkout's code, as pytest runs it.
    from tests import conftest  # noqa: F401  (its XLA flags and devices; no backend is up yet)

    with tempfile.TemporaryDirectory() as scratch:
        copy_workdir(Path(scratch))
        os.chdir(scratch)
        SCORES.write_text(json.dumps(release_scores(), indent=1) + "\n")
