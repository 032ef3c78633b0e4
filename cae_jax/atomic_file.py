"""Whole-file replacement: a reader sees the old file or the new one, never a part of either.

The one way every command writes a small file in place (configs, manifests, reports, the crop
cache): a temporary file beside the target, flushed to disk, renamed over it; a failure at any
point removes the temporary file and leaves the target as it was. Light on purpose (no JAX, no
TensorFlow): `data_prep` imports it too. Paths may be `etils.epath` paths on gs:// (Beam
runners), where a write is whole when it closes and there is nothing to fsync.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def temporary_path(path: epath.Path) -> epath.Path:
    """A fresh hidden name beside `path` (same folder, so the rename stays on one filesystem)."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces `path` with `data` atomically and durably."""
    path = epath.Path(path)
    tmp = temporary_path(path)
    local = "://" not in os.fspath(path)
    try:
        tmp.write_bytes(data)
        if local:
            _fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if local:  # The rename itself survives a power cut once its folder is synced.
        _fsync(path.parent)


def _fsync(path: epath.Path) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode())
