"""Folders a command writes: one writer per folder (a lock file naming the host and process
that hold it), and outputs that could not be created refused before the work.

Two runs writing one folder destroy each other's work (two `prepare`s delete each other's
temporary shards; two `train`s overwrite each other's checkpoints and metrics, both reporting
success); the second is refused by name instead. A lock left by a process of this host that is
no longer running (killed) is taken over, saying so; one of another host cannot be checked from
here, so the refusal says how to clear it. On object stores (gs://), which have no exclusive
create, the lock is best effort. Light on purpose: `data_prep` imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from etils import epath

LOCK_FILE = "cae-jax.lock"


class DirectoryError(RuntimeError):
    """A folder cannot be written: held by another live process (or one this host cannot
    check), a file, or not writable."""


def make_directory(directory: str | os.PathLike, flag: str) -> None:
    """Creates `directory` (and parents), one line naming `flag` where it cannot be one."""
    directory = epath.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DirectoryError(f"{flag} {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DirectoryError(
            f"{flag} {directory}: cannot create it ({err.strerror or err})") from err


def check_can_create(path: str | os.PathLike, flag: str) -> None:
    """Raises DirectoryError (one line naming `flag`) where `path` could not be created:
    under a file, or in a directory this user cannot write. Checked before the work whose
    result goes there; gs:// paths pass."""
    if "://" in os.fspath(path):
        return
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DirectoryError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DirectoryError(f"{flag} {path}: {ancestor} is not writable")


@contextlib.contextmanager
def hold(directory: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds DIRECTORY/cae-jax.lock (the directory must exist) while the block runs; raises
    DirectoryError naming the holder where another run has it."""
    path = epath.Path(directory) / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    _acquire(path, mine)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _holder(path) == mine:  # Not the lock of a run that took it over meanwhile.
                path.unlink()


def _acquire(path: epath.Path, mine: dict) -> None:
    for _ in range(3):  # Again after a stale lock is taken over, or released meanwhile.
        if _create(path, json.dumps(mine)):
            return
        try:
            holder = _holder(path)
        except FileNotFoundError:
            continue
        if holder is None or _alive(holder):
            who = (f"{holder['command']} (process {holder['pid']} on {holder['host']})"
                   if holder else "another run")
            raise DirectoryError(
                f"{path.parent} is in use by {who}: wait for it to finish, or use another "
                f"directory; if no such run is going on, remove {path}")
        print(f"{mine['command']}: {path}: taking over the lock of process {holder['pid']} "
              f"({holder['command']}), which is no longer running", file=sys.stderr)
        path.unlink(missing_ok=True)
    raise DirectoryError(f"{path}: another run keeps taking the lock; try again")


def _create(path: epath.Path, text: str) -> bool:
    """Creates `path` holding `text` unless it exists; whether it did."""
    try:
        if "://" in os.fspath(path):
            if path.exists():
                return False
            path.write_text(text)
            return True
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as err:
        raise DirectoryError(f"{path}: cannot create the lock ({err.strerror or err})") from err
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _holder(path: epath.Path) -> dict | None:
    """The lock's holder; None when unreadable (being written this very moment, or foreign).
    FileNotFoundError when there is none."""
    try:
        holder = json.loads(path.read_text())
    except ValueError:
        return None
    if (isinstance(holder, dict) and {"pid", "host", "command"} <= holder.keys()
            and isinstance(holder["pid"], int)):
        return holder
    return None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: on another host, it cannot be told, so it may. This
    very process id is an earlier process's, reused (a restarted container): not running."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process.
        return True
    return True
