"""atomic_file: every in-place write of the project goes through one temp-fsync-rename helper."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from etils import epath

from cae_jax import atomic_file, checkpoints, predict, sweep, train
from cae_jax import config as config_lib
from data_prep import work, writer


def test_writes_whole_and_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(synced) == 1:  # The temporary file, before the rename: the target is still old.
            assert target.read_text() == "old"
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_file.write_text(target, "new")
    assert target.read_text() == "new"
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".a.json.tmp-")
    assert synced[1:] == [str(tmp_path)]  # Then the folder, so the rename is durable too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def _full_disk(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


# Each in-place write of the project, with what it writes and where.
CALLERS = {
    "train.truncate_records": lambda d: train.truncate_records(epath.Path(d / "f"), 5),
    "checkpoints.write_config": lambda d: checkpoints.write_config(d, config_lib.default_config()),
    "predict.write_report": lambda d: predict.write_report({"a": 1}, d / "f"),
    "work._write_atomic": lambda d: work._write_atomic(epath.Path(d / "f"), b"x", "v"),
    "writer.write_json_atomic": lambda d: writer.write_json_atomic(d / "f", {"a": 1}),
    "sweep.write_plan": lambda d: sweep.write_plan(str(d), {"runs": []}),
}
TARGETS = {"checkpoints.write_config": checkpoints.CONFIG_FILE, "sweep.write_plan": sweep.PLAN_FILE}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_every_writer_keeps_the_old_file_and_no_temporary_when_the_write_fails(
    caller, tmp_path, monkeypatch
):
    """A failure between writing and renaming (here fsync on a full disk) leaves the old file
    untouched and nothing else behind: the six writers share the helper."""
    target = tmp_path / TARGETS.get(caller, "f")
    old = json.dumps({"step": 1}) + "\n"
    if caller != "sweep.write_plan":  # It never replaces a plan: it writes the first one.
        target.write_text(old)
    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        CALLERS[caller](tmp_path)
    if caller == "sweep.write_plan":
        assert not any(tmp_path.iterdir())
    else:
        assert target.read_text() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("module", ["cae_jax.atomic_file", "cae_jax.dir_lock"])
def test_what_data_prep_imports_of_cae_jax_imports_nothing_heavy(module):
    code = (f"import sys; import {module}; "
            "print(sorted(m for m in ('jax', 'tensorflow', 'numpy', 'cv2') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout
    assert found.strip() == "[]"
