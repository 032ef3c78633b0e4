"""Random access to TFRecord files: an index of record offsets, reads checked by CRC32C.

Indexing lets grain shuffle, shard and checkpoint by record number (a resumed run restarts
at the exact record), and the CRCs of the framing catch truncated or corrupted shards. A
TFRecord is a sequence of frames:

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

Only the 12-byte headers are read when indexing; a record's data CRC is checked when read.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
from collections.abc import Sequence
from typing import TypedDict

import google_crc32c
import numpy as np
import tqdm
from etils import epath

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(ValueError):
    """A TFRecord shard that is truncated or whose bytes do not match their checksum."""

    def __init__(self, path: str, offset: int, problem: str):
        super().__init__(f"{path}: corrupt TFRecord at byte offset {offset}: {problem}")
        self.path = path
        self.offset = offset


_skipped = 0
_skipped_lock = threading.Lock()


def skip_or_raise(error: CorruptRecordError, skip: bool) -> None:
    """Raises `error`, or with `skip` logs it with the count of records skipped so far."""
    global _skipped
    if not skip:
        raise error
    with _skipped_lock:
        _skipped += 1
        count = _skipped
    logging.warning("skipped corrupt record (%d so far in this process): %s", count, error)


class RawRecord(TypedDict):
    data: bytes
    path: str  # Shard file and byte offset of the record's frame, to name it in errors.
    offset: int


def masked_crc(data: bytes) -> int:
    """TFRecord's CRC32C with the rotation and offset that protect CRCs of CRCs."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """`data` as one TFRecord frame, checksums included."""
    length = struct.pack("<Q", len(data))
    return length + _FOOTER.pack(masked_crc(length)) + data + _FOOTER.pack(masked_crc(data))


def index_file(path: str, *, skip_corrupt: bool = False) -> np.ndarray:
    """Byte offsets of every record frame in one shard, from the headers only.

    A bad length CRC or a record running past the end of the file raises
    `CorruptRecordError`; with `skip_corrupt` the rest of the file is dropped instead (the
    length can no longer be trusted to find the next frame), logged and counted.
    """
    offsets = []
    size = epath.Path(path).stat().length
    with epath.Path(path).open("rb") as f:
        offset = 0
        while offset < size:
            problem = None
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                problem = f"file ends inside a record header ({size - offset} bytes left)"
            else:
                length, length_crc = _HEADER.unpack(header)
                end = offset + _HEADER.size + length + _FOOTER.size
                if masked_crc(header[:8]) != length_crc:
                    problem = "length checksum mismatch"
                elif end > size:
                    problem = f"record of {length} bytes runs past the end of the file ({size})"
            if problem:
                problem += "; the rest of the file cannot be framed"
                skip_or_raise(CorruptRecordError(path, offset, problem), skip_corrupt)
                break
            offsets.append(offset)
            offset = end
            f.seek(offset)
    return np.asarray(offsets, dtype=np.int64)


def _read_frame(f, path: str, offset: int) -> bytes:
    """The data of the frame at `offset` (where `f` stands); raises `CorruptRecordError`.

    The file may have changed since it was indexed (shrunk, rewritten), so every part of the
    frame is checked rather than trusted.
    """
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise CorruptRecordError(path, offset, "file ends inside the record header (shrunk?)")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc(header[:8]) != length_crc:
        raise CorruptRecordError(path, offset, "length checksum mismatch")
    data = f.read(length)
    footer = f.read(_FOOTER.size)
    if len(data) < length or len(footer) < _FOOTER.size:
        problem = f"file ends inside a record of {length} bytes (shrunk?)"
        raise CorruptRecordError(path, offset, problem)
    if masked_crc(data) != _FOOTER.unpack(footer)[0]:
        raise CorruptRecordError(path, offset, "data checksum mismatch")
    return data


class IndexedTFRecords:
    """A grain `RandomAccessDataSource` over the records of several TFRecord files.

    Record `i` counts through the files in the order given. Reads use one file handle per
    file and thread, so grain's reader threads do not contend. Items are `RawRecord`s; a
    record whose data fails its CRC raises `CorruptRecordError`, or with `skip_corrupt` is
    logged with a running count and read as None (grain drops Nones).
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        num_records: Sequence[int] | None = None,
        skip_corrupt: bool = False,
    ):
        """`num_records`, if given, is each file's expected record count (dataset metadata)."""
        self.paths = [os.fspath(p) for p in paths]
        self.skip_corrupt = skip_corrupt
        files = tqdm.tqdm(self.paths, desc="indexing TFRecords", unit="file", disable=None)
        self._offsets = [index_file(p, skip_corrupt=skip_corrupt) for p in files]
        if num_records is not None:
            for path, offsets, expected in zip(self.paths, self._offsets, num_records, strict=True):
                if len(offsets) != expected:
                    self._count_mismatch(path, len(offsets), expected)
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()
        self._local = threading.local()

    def _count_mismatch(self, path: str, found: int, expected: int) -> None:
        size = epath.Path(path).stat().length
        problem = f"the file holds {found} records, its dataset metadata lists {expected}"
        if not self.skip_corrupt:
            raise CorruptRecordError(path, size, problem)
        logging.warning("%s: %s; reading the %d there are", path, problem, found)

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"IndexedTFRecords({len(self.paths)} files, {len(self)} records)"

    def __getstate__(self):
        # File handles stay with the process that opened them; workers open their own.
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def locate(self, index: int) -> tuple[str, int]:
        """(file, byte offset) of record `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        file_index = bisect.bisect_right(self._starts, index) - 1
        offset = self._offsets[file_index][index - self._starts[file_index]]
        return self.paths[file_index], int(offset)

    def __getitem__(self, index: int) -> RawRecord | None:
        path, offset = self.locate(index)
        f = self._handle(path)
        f.seek(offset)
        try:
            data = _read_frame(f, path, offset)
        except CorruptRecordError as err:
            skip_or_raise(err, self.skip_corrupt)
            return None
        return RawRecord(data=data, path=path, offset=offset)

    def _handle(self, path: str):
        handles = self._local.__dict__.setdefault("handles", {})
        if path not in handles:
            handles[path] = epath.Path(path).open("rb")
        return handles[path]
