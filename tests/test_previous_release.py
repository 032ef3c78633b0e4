"""Work written by the previous release keeps working after `default_config` gains fields:
its workdir resumes, evaluates and exports, its bundle predicts (tests/fixtures/previous_release,
made by commit eeca69b; its README says how)."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from cae_jax import checkpoints, main, serving
from cae_jax import config as config_lib
from tests import datasets

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "previous_release"
ROOT = FIXTURE.parents[2]
SAVED_OVERRIDES = json.loads((FIXTURE / "workdir" / "config.json").read_text())


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


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A copy of the old workdir beside the prepared data its config.json names ("data")."""
    datasets.write(tmp_path / "data", {"train": (4, 4), "validation": (4, 4)}, num_shards=1)
    shutil.copytree(FIXTURE / "workdir", tmp_path / "workdir")
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
