"""One writer per folder: a live holder (or one of another host) is refused by name with how to
clear it, a dead one's lock is taken over saying so, and a folder or output that cannot be
created is one line. The `cae-jax train` tests run the real command (two processes on one
workdir); `prepare`'s are in test_prepare.py, that it imports nothing heavy in
test_atomic_file.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cae_jax import dir_lock, train
from tests import datasets

ROOT = Path(__file__).resolve().parent.parent


def _leave_lock(folder: Path, pid: int, host: str | None = None,
                command: str = "cae-jax prepare") -> None:
    holder = {"pid": pid, "host": host or socket.gethostname(), "command": command}
    (folder / dir_lock.LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def _refusal(folder: Path, who: str) -> str:
    return (f"{folder} is in use by {who}: wait for it to finish, or use another directory; "
            f"if no such run is going on, remove {folder / 'cae-jax.lock'}")


def test_holds_while_the_block_runs_and_releases_after(tmp_path):
    with dir_lock.hold(tmp_path, "cae-jax prepare"):
        held = json.loads((tmp_path / "cae-jax.lock").read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname(),
                        "command": "cae-jax prepare"}
    assert not (tmp_path / "cae-jax.lock").exists()


def test_a_lock_taken_over_meanwhile_is_not_released(tmp_path):
    with dir_lock.hold(tmp_path, "cae-jax prepare"):
        _leave_lock(tmp_path, 1, "another-host")
    assert json.loads((tmp_path / "cae-jax.lock").read_text())["host"] == "another-host"


@pytest.mark.parametrize("host", [None, "another-host"])
def test_a_live_holder_or_one_on_another_host_is_refused_by_name(tmp_path, host):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            _leave_lock(tmp_path, live.pid, host)
            with pytest.raises(dir_lock.DirectoryError) as refused:
                with dir_lock.hold(tmp_path, "cae-jax prepare"):
                    pass
        finally:
            live.kill()
    where = host or socket.gethostname()
    assert str(refused.value) == _refusal(
        tmp_path, f"cae-jax prepare (process {live.pid} on {where})")
    assert json.loads((tmp_path / "cae-jax.lock").read_text())["pid"] == live.pid  # Left alone.


@pytest.mark.parametrize("text", ["", '{"pid": "1"}', "a lock of some other tool"])
def test_a_lock_that_names_no_holder_is_refused(tmp_path, text):
    """Being written this very moment, or not ours: never taken over."""
    (tmp_path / "cae-jax.lock").write_text(text)
    with pytest.raises(dir_lock.DirectoryError) as refused:
        with dir_lock.hold(tmp_path, "cae-jax prepare"):
            pass
    assert str(refused.value) == _refusal(tmp_path, "another run")
    assert (tmp_path / "cae-jax.lock").read_text() == text


@pytest.mark.parametrize("reused", [False, True])
def test_a_dead_holders_lock_is_taken_over_saying_so(tmp_path, capsys, reused):
    """Dead: its process is gone, or its id is this very process's (a restarted container)."""
    pid = os.getpid() if reused else _dead_pid()
    _leave_lock(tmp_path, pid)
    with dir_lock.hold(tmp_path, "cae-jax prepare"):
        assert json.loads((tmp_path / "cae-jax.lock").read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"cae-jax prepare: {tmp_path / 'cae-jax.lock'}: taking over the lock of process {pid} "
        "(cae-jax prepare), which is no longer running\n")


def train_command(workdir: Path, data_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "cae_jax.main", "train", "--config",
            str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
            f"--config.input.train_dirs=('{data_dir}',)", f"--config.train.steps={steps}"]


def test_a_second_run_on_a_workdir_is_refused_and_a_dead_runs_lock_taken_over(tmp_path,
                                                                               capsys):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8)}, num_shards=1)
    workdir = tmp_path / "run"
    first = subprocess.Popen(train_command(workdir, data_dir, 100_000), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = workdir / dir_lock.LOCK_FILE
        deadline = time.time() + 300
        while not lock.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert lock.is_file(), "the first run never took the lock"
        second = subprocess.run(train_command(workdir, data_dir, 4), cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1] == "error: " + _refusal(
            workdir, f"cae-jax train (process {first.pid} on {socket.gethostname()})")
        assert first.poll() is None, "the refused run stopped the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # The killed run's lock is left behind; the next run takes it over, saying so.
    assert json.loads(lock.read_text())["pid"] == first.pid
    capsys.readouterr()
    with train.sole_writer(workdir):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"cae-jax train: {lock}: taking over the lock of process {first.pid} (cae-jax train), "
        "which is no longer running\n")
    assert not lock.exists(), "released at the end"


def test_a_lock_of_another_host_is_refused_with_how_to_clear_it(tmp_path):
    _leave_lock(tmp_path, 1, "elsewhere", "cae-jax train")
    with pytest.raises(dir_lock.DirectoryError) as refused:
        with train.sole_writer(tmp_path):
            pass
    assert str(refused.value) == _refusal(tmp_path, "cae-jax train (process 1 on elsewhere)")


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
    with pytest.raises(dir_lock.DirectoryError, match=f"--out {locked}/m.json: {locked} is "
                       "not writable"):
        dir_lock.check_can_create(locked / "m.json", "--out")


def test_a_gs_out_is_never_looked_up_locally(tmp_path, monkeypatch):
    """As a local path it would be ./gs:/bucket/...: here under a file named gs:."""
    (tmp_path / "gs:").write_text("a file")
    monkeypatch.chdir(tmp_path)
    dir_lock.check_can_create("gs://bucket/eval/metrics.json", "--out")  # No error.


def test_evaluate_refuses_a_negative_batch_size_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cae_jax.main", "evaluate", "--checkpoint",
                             "run", "--data", "data", "--out", "m.json", "--batch-size", "-4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --batch-size -4: must be >= 0 (0: the run's eval batch)"
