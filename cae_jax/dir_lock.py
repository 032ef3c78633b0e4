"""One writer per output folder: a lock file naming the process that holds it.

Two runs writing one folder destroy each other's work (one's cleanup deletes the other's
temporary files); the second is refused by name instead. A lock left by a process that is no
longer running (killed) is taken over, saying so. Light on purpose (`data_prep` imports it).
On object stores (gs://), which have no exclusive create, the check is best effort.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator

from etils import epath

LOCK_FILE = ".lock"


class LockedError(RuntimeError):
    """Another live process holds the folder."""


@contextlib.contextmanager
def hold(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds FOLDER/.lock (the folder must exist) while the block runs."""
    path = epath.Path(folder) / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    _acquire(path, mine)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _acquire(path: epath.Path, mine: dict) -> None:
    for _ in range(3):  # Again after a stale lock is taken over, or released meanwhile.
        if _create(path, json.dumps(mine)):
            return
        try:
            holder = _parse(path.read_text())
        except FileNotFoundError:
            continue
        if holder is None or _alive(holder):
            who = (f"{holder['command']} (process {holder['pid']} on {holder['host']})"
                   if holder else "another run")
            raise LockedError(
                f"{path.parent} is being written by {who}: wait for it to finish, or delete "
                f"{path} if no such run is going on"
            )
        print(f"{mine['command']}: {path}: taking over the lock of process {holder['pid']} "
              f"({holder['command']}), which is no longer running", file=sys.stderr)
        path.unlink(missing_ok=True)
    raise LockedError(f"{path.parent} is being written by another run (it took {path} first)")


def _create(path: epath.Path, text: str) -> bool:
    """Creates `path` holding `text` unless it exists; whether it did."""
    if "://" in os.fspath(path):
        if path.exists():
            return False
        path.write_text(text)
        return True
    try:
        fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _parse(text: str) -> dict | None:
    """The lock's holder; None when unreadable (being written this very moment, or foreign)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    if isinstance(holder, dict) and {"pid", "host", "command"} <= holder.keys():
        return holder
    return None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: on another host, it cannot be told, so it may. This
    very process id is an earlier process's, reused (a restarted container): not running."""
    if holder["host"] != socket.gethostname():
        return True
    if int(holder["pid"]) == os.getpid():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process.
        return True
    return True
