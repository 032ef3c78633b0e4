"""What the trainer says when its input or its workdir is bad: one line naming the file, and
no work lost (a failed validation keeps its step's checkpoint)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from cae_jax import checkpoints, main, prepared_data
from tests import datasets, test_previous_release, test_train

ROOT = Path(__file__).resolve().parent.parent


def train_cli(workdir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "train", "--config",
         str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
         f"--config.input.train_dirs=('{data_dir}',)", "--config.train.log_every=1",
         *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_corrupt_validation_record_is_named_and_keeps_the_steps_checkpoint(tmp_path):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8), "validation": (4, 4)},
                              num_shards=1)
    shard, _ = prepared_data.split_shards(data_dir, "validation")[0]
    with open(shard, "r+b") as f:  # Flip a byte inside the first record's data.
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    workdir = tmp_path / "run"
    schedule = ("--config.train.steps=4", "--config.train.eval_every=2",
                "--config.train.checkpoint_every=100")
    result = train_cli(workdir, data_dir, *schedule)
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: validation at step 2 failed ({shard}: corrupt TFRecord at byte offset 0: "
        "data checksum mismatch); the step's checkpoint is saved, a resume continues after it")
    assert test_train.saved_steps(workdir) == [2]
    # The resume trains on from step 2 (steps 1-2 are not redone) to the next validation.
    result = train_cli(workdir, data_dir, *schedule)
    assert result.returncode == 1
    assert f"resumed from {workdir / 'checkpoints'} at step 2" in result.stdout
    assert last_line(result).startswith(f"error: validation at step 4 failed ({shard}: ")
    assert test_train.saved_steps(workdir) == [2, 4]
    assert [r["step"] for r in test_train.records(workdir)] == [1, 2, 3, 4]


def test_a_malformed_dataset_info_is_named(tmp_path):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8)}, num_shards=1)
    info = data_dir / "dataset_info.json"
    info.write_text(info.read_text().replace('"train"', '"tra\tin"'))
    result = train_cli(tmp_path / "run", data_dir, "--config.train.steps=2")
    assert result.returncode == 1
    assert last_line(result).startswith(
        f"error: {info}: not a dataset_info.json written by `cae-jax prepare` (Invalid control "
        "character")
    assert "Exception in thread" not in result.stderr


# A workdir of the tiny fixture model (tests/fixtures/previous_release) and how to resume it.
FIXTURE = ROOT / "tests" / "fixtures" / "previous_release"


@pytest.fixture
def fixture_run(tmp_path, monkeypatch):
    datasets.write(tmp_path / "data", {"train": (4, 4), "validation": (4, 4)}, num_shards=1)
    shutil.copytree(FIXTURE / "workdir", tmp_path / "workdir")
    shutil.copytree(FIXTURE / "bundle", tmp_path / "bundle")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def resume(steps: int) -> int:
    return main.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
                      "workdir", *test_previous_release.model_overrides(),
                      f"--config.train.steps={steps}"])


def test_resume_falls_back_to_the_newest_intact_step_naming_the_broken_one(tmp_path):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8)}, num_shards=1)
    workdir = tmp_path / "run"
    checkpoints_dir = workdir / "checkpoints"
    assert train_cli(workdir, data_dir, "--config.train.steps=4",
                     "--config.train.checkpoint_every=2").returncode == 0
    uninterrupted = test_train.records(workdir)
    shutil.copytree(checkpoints_dir / "4", tmp_path / "uninterrupted" / "checkpoints" / "4")
    # Partly deleted: the root node of the state's tree, so that every array read fails.
    [root_node] = (checkpoints_dir / "4" / "state" / "d").iterdir()
    root_node.unlink()

    result = train_cli(workdir, data_dir, "--config.train.steps=4",
                       "--config.train.checkpoint_every=2")
    assert result.returncode == 0, result.stderr
    assert f"resumed from {checkpoints_dir} at step 2" in result.stdout
    # The project's warning about the broken step, once; no Orbax or asyncio tracebacks.
    assert "Traceback" not in result.stderr and "Event loop" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.replace("\r", "\n").splitlines()
                if line.startswith(f"WARNING:root:{checkpoints_dir / '4'}: unreadable")]
    assert len(warnings) == 1, result.stderr
    [warning] = warnings
    assert warning.startswith(f"WARNING:root:{checkpoints_dir / '4'}: unreadable (NOT_FOUND: ")
    assert warning.endswith("; set aside as 4.unreadable, resuming from an earlier step")
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == ["2", "4", "4.unreadable"]
    # Resumed from step 2, the run saved step 4 again as the uninterrupted run did.
    config = test_train.config_for(data_dir)
    test_train.assert_trees_equal(test_train.full_state(workdir, config, 4),
                                  test_train.full_state(tmp_path / "uninterrupted", config, 4))
    assert ([test_train.deterministic(r) for r in test_train.records(workdir)]
            == [test_train.deterministic(r) for r in uninterrupted])


def test_resume_below_the_checkpoints_step_says_nothing_was_trained(fixture_run, capsys):
    assert resume(1) == 0
    assert (f"nothing to train: the checkpoint in {fixture_run / 'workdir' / 'checkpoints'} is "
            "at step 2 and train.steps=1; pass a larger --config.train.steps to train on"
            in capsys.readouterr().err)
    assert sorted(p.name for p in (fixture_run / "workdir" / "checkpoints").iterdir()) == ["2"]


def edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_a_checkpoint_or_bundle_of_another_model_is_named_in_one_line(fixture_run):
    workdir = fixture_run / "workdir"
    edit_json(workdir / "config.json",
              lambda c: c["model"]["encoder"].update(stem_features=[8, 8]))
    result = subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "export", "--workdir", str(workdir), "--out",
         str(fixture_run / "out"), "--formats="], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: {workdir / 'checkpoints' / '2'}: saved from another model than "
        f"{workdir / 'config.json'} describes (array batch_stats.encoder.bn1.mean.value has "
        "shape (4,), that config makes (8,))")
    assert not (fixture_run / "out").exists()

    bundle = fixture_run / "bundle"
    edit_json(bundle / "model.json",
              lambda m: m["model"]["encoder"].update(stem_features=[8, 8]))
    image = fixture_run / "face.png"
    cv2.imwrite(str(image), datasets.face_crop(0))
    result = subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "predict", "--model", str(bundle), "--no-detect",
         str(image)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2  # predict's status for a bad input.
    assert re.fullmatch(
        rf"error: {re.escape(str(bundle / 'params'))}: array '[\w.]+' has shape \(.*\), the "
        rf"model's is \(.*\): saved from another model than "
        rf"{re.escape(str(bundle / 'model.json'))} describes", last_line(result))


def test_a_full_disk_stops_before_the_save_in_one_line(fixture_run, monkeypatch):
    checkpoints_dir = fixture_run / "workdir" / "checkpoints"
    step_2 = sum(f.stat().st_blocks * 512 for f in (checkpoints_dir / "2").rglob("*")
                 if f.is_file())
    free = step_2  # Room for one more step, not for two (the one in flight and the next).
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 * free, 9 * free, free))
    with pytest.raises(SystemExit, match=re.escape(
            f"error: {checkpoints_dir}: disk full ({free / 2**20:.1f} MiB free, a checkpoint "
            f"needs {2 * step_2 / 2**20:.1f} MiB); free space, then resume")):
        resume(4)
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == ["2"]


def test_a_resume_from_a_step_of_another_model_is_one_line_not_a_fallback(fixture_run):
    workdir = fixture_run / "workdir"
    edit_json(workdir / "config.json",
              lambda c: c["model"]["encoder"].update(stem_features=[8, 8]))
    result = subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "train", "--config",
         str(ROOT / "configs" / "tiny.py"), "--workdir", "workdir",
         *test_previous_release.model_overrides(), "--config.model.encoder.stem_features=(8,8)",
         "--config.train.steps=4"], cwd=fixture_run, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: {workdir / 'checkpoints' / '2'}: saved from another model than "
        f"{workdir / 'config.json'} describes (array "
        "params.encoder.blocks.0.seps.0.depthwise.value has shape (3, 3, 1, 4), that config "
        "makes (3, 3, 1, 8))")
    assert "Event loop" not in result.stderr and "unreadable" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
