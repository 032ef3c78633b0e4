"""One `cae-jax train` per workdir: a second run is refused by name while the first lives, a
lock left by a killed run is taken over, and a --workdir that is a file is one line."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cae_jax import train, workdir_lock
from tests import datasets

ROOT = Path(__file__).resolve().parent.parent


def train_command(workdir: Path, data_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "cae_jax.main", "train", "--config",
            str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.input.train_dirs=('{data_dir}',)", f"--config.train.steps={steps}"]


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_runs_lock_taken_over(tmp_path,
                                                                               caplog):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8)}, num_shards=1)
    workdir = tmp_path / "run"
    first = subprocess.Popen(train_command(workdir, data_dir, 100_000), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = workdir / workdir_lock.LOCK_FILE
        deadline = time.time() + 300
        while not lock.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lock.is_file(), "the first run never took the lock"
        second = subprocess.run(train_command(workdir, data_dir, 4), cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"error: {workdir} is in use by cae-jax train (process {first.pid} on "
            f"{socket.gethostname()})")
        assert first.poll() is None, "the refused run stopped the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # The killed run's lock is left behind; the next run takes it over with a warning.
    assert json.loads(lock.read_text())["pid"] == first.pid
    caplog.set_level(logging.WARNING)
    with train.sole_writer(workdir):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {first.pid} (cae-jax train), which is gone" \
        in caplog.text
    assert not lock.exists(), "released at the end"


def test_a_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "command": "cae-jax train"}))
    with pytest.raises(workdir_lock.DirectoryError,
                       match=r"in use by cae-jax train \(process 1 on elsewhere\).*remove "):
        with train.sole_writer(tmp_path):
            pass


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    result = subprocess.run(train_command(workdir, tmp_path / "none", 4), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: --workdir {workdir} is a file, not a directory"


@pytest.mark.parametrize("command", [
    ["evaluate", "--checkpoint", "no-such-run", "--data", "no-such-data", "--out"],
    ["export", "--workdir", "no-such-run", "--out"],
])
def test_an_out_under_a_file_is_refused_before_anything_is_read(tmp_path, command):
    blocker = tmp_path / "report.txt"
    blocker.write_text("a file")
    out = blocker / "eval" / "metrics.json"
    result = subprocess.run([sys.executable, "-m", "cae_jax.main", *command, str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # Refused for --out before the missing checkpoint is even looked for.
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: --out {out}: {blocker} is a file, not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_out_in_a_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(workdir_lock.DirectoryError, match=f"--out {locked}/m.json: {locked} is "
                       "not writable"):
        workdir_lock.check_can_create(locked / "m.json", "--out")


def test_evaluate_refuses_a_negative_batch_size_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cae_jax.main", "evaluate", "--checkpoint",
                             "run", "--data", "data", "--out", "m.json", "--batch-size", "-4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --batch-size -4: must be >= 0 (0: the run's eval batch)"
