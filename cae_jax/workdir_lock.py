"""Directories a command writes: one writer per workdir (a lock file naming the host and
process that hold it), and outputs that could not be created refused before the work.

Two `cae-jax train` runs on one workdir would each replace metrics.jsonl under the other's open
handle and overwrite each other's checkpoints, both reporting success; the second is refused
instead, by name. A lock left by a process that is gone (killed before it could release it,
on this host) is taken over with a warning; one of another host cannot be checked from here,
so the error says how to clear it. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "cae-jax.lock"


class DirectoryError(RuntimeError):
    """A directory cannot be written: held by another live process (or one this host cannot
    check), a file, or not writable."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's owner record; None while it is being written (or unreadable)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def make_directory(directory: Path, flag: str) -> None:
    """Creates `directory` (and parents), one line naming `flag` where it cannot be one."""
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
    path = Path(path).absolute()
    if "://" in str(path):
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DirectoryError(f"{flag} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DirectoryError(f"{flag} {path}: {ancestor} is not writable")


def acquire(directory: Path, command: str) -> Path:
    """Creates DIRECTORY/cae-jax.lock for this process; raises DirectoryError naming the holder."""
    path = directory / LOCK_FILE
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if (holder and holder.get("host") == owner["host"]
                    and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])):
                logging.warning("%s: taking over the lock of process %d (%s), which is gone.",
                                path, holder["pid"], holder.get("command", "?"))
                path.unlink(missing_ok=True)
                continue
            who = (f"{holder.get('command', '?')} (process {holder.get('pid')} on "
                   f"{holder.get('host')})" if holder else "another process")
            raise DirectoryError(
                f"{directory} is in use by {who}: one run writes a directory at a time. "
                f"Wait for it, or use another directory; if that process is gone, remove "
                f"{path}.") from None
        except OSError as err:
            raise DirectoryError(f"{path}: cannot create the lock ({err.strerror or err})") from err
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        return path
    raise DirectoryError(f"{path}: another process keeps taking the lock; try again")


def release(path: Path) -> None:
    """Removes the lock if this process still holds it."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(directory: Path, command: str) -> Iterator[Path]:
    """`acquire` ... `release` around a block."""
    path = acquire(directory, command)
    try:
        yield path
    finally:
        release(path)
