"""Entries that kill or hold up the `prepare` worker processing them, for the pool tests.

A separate module because spawned pool workers import the module of each entry they
unpickle: this one loads in a fraction of a second, `test_prepare` (TensorFlow) in seconds,
on every pool restart.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from data_prep import work
from data_prep.entries import Entry


@dataclasses.dataclass(frozen=True)
class CrashingEntry(Entry):
    """An entry whose processing kills its worker process, as a decoder crash would."""

    @property
    def is_image(self) -> bool:
        os._exit(3)


def _wait_for(pattern: str, folder: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not list(Path(folder).glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclasses.dataclass(frozen=True)
class SelfKillingEntry(Entry):
    """Kills its own process with SIGKILL, as a decoder crash would, once `other` is in flight
    in another worker (its attempt marker exists). The first attempt waits for that (both
    start together); a retry may run while `other` waits in the pool's queue, so it waits
    only briefly."""

    other: str = ""
    work_dir: str = ""

    @property
    def is_image(self) -> bool:
        first = Path(self.work_dir, "first-crash")
        _wait_for(f"{work.cache_key(self.other)}.attempt*", self.work_dir,
                  seconds=5 if first.exists() else 60)
        first.touch()
        os.kill(os.getpid(), signal.SIGKILL)
        return False


@dataclasses.dataclass(frozen=True)
class SlowEntry(Entry):
    """A healthy video that stays in flight until `other` is finished (cached)."""

    other: str = ""
    work_dir: str = ""

    @property
    def is_image(self) -> bool:
        _wait_for(f"{work.cache_key(self.other)}.json", self.work_dir)
        return False
