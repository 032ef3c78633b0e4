"""What the trainer says when its input or its workdir is bad: one line naming the file, and
no work lost (a failed validation keeps its step's checkpoint)."""

import subprocess
import sys
from pathlib import Path

from cae_jax import prepared_data
from tests import datasets

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
    result = train_cli(workdir, data_dir, "--config.train.steps=4",
                       "--config.train.eval_every=2", "--config.train.checkpoint_every=100")
    assert result.returncode == 1
    assert last_line(result) == (
        f"error: validation at step 2 failed ({shard}: corrupt TFRecord at byte offset 0: "
        "data checksum mismatch); the step's checkpoint is saved, a resume continues after it")
    assert (workdir / "checkpoints" / "2" / "state").is_dir()


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
