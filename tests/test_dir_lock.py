"""dir_lock: one writer per folder; a live holder refuses by name, a dead one's lock is taken."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from cae_jax import dir_lock


def _leave_lock(folder, pid: int, host: str | None = None) -> None:
    holder = {"pid": pid, "host": host or socket.gethostname(), "command": "cae-jax prepare"}
    (folder / dir_lock.LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_holds_while_the_block_runs_and_releases_after(tmp_path):
    with dir_lock.hold(tmp_path, "cae-jax prepare"):
        held = json.loads((tmp_path / ".lock").read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname(),
                        "command": "cae-jax prepare"}
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("host", [None, "another-host"])
def test_a_live_holder_or_one_on_another_host_is_refused_by_name(tmp_path, host):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            _leave_lock(tmp_path, live.pid, host)
            with pytest.raises(dir_lock.LockedError) as refused:
                with dir_lock.hold(tmp_path, "cae-jax prepare"):
                    pass
        finally:
            live.kill()
    where = host or socket.gethostname()
    assert str(refused.value) == (
        f"{tmp_path} is being written by cae-jax prepare (process {live.pid} on {where}): "
        f"wait for it to finish, or delete {tmp_path / '.lock'} if no such run is going on")
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == live.pid  # Left alone.


@pytest.mark.parametrize("reused", [False, True])
def test_a_dead_holders_lock_is_taken_over_saying_so(tmp_path, capsys, reused):
    """Dead: its process is gone, or its id is this very process's (a restarted container)."""
    pid = os.getpid() if reused else _dead_pid()
    _leave_lock(tmp_path, pid)
    with dir_lock.hold(tmp_path, "cae-jax prepare"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert capsys.readouterr().err == (
        f"cae-jax prepare: {tmp_path / '.lock'}: taking over the lock of process {pid} "
        "(cae-jax prepare), which is no longer running\n")
