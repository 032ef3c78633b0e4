"""Per-face scores as a file (`evaluate --scores-out`): Parquet or CSV, by the extension.

One row per scored face: `data` (the result key of its data dir), the record's `dataset`,
`split`, `perturbation` ("" for the stored crop, else e.g. "jpeg:50"), `method`, `video_id`,
`frame_index`, `label`, `prob` and `recon_error`. `evaluate --from-scores` and `compare` read
it back into the column arrays `score_split` returns; floats round-trip exactly (Parquet
stores float64, CSV Python's shortest exact repr), so every table recomputes to the same
numbers.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from etils import epath

TEXT_COLUMNS = ("data", "dataset", "split", "perturbation", "method", "video_id")
INT_COLUMNS = ("frame_index", "label")
FLOAT_COLUMNS = ("prob", "recon_error")
COLUMNS = (*TEXT_COLUMNS, *INT_COLUMNS, *FLOAT_COLUMNS)
FORMATS = (".parquet", ".csv")


def check_path(path: str | os.PathLike) -> str:
    """The file's format by its extension; another extension is a ValueError naming it."""
    path = epath.Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{path}: scores file must end in .parquet or .csv")
    return path.suffix


def concatenate(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of several score tables (same columns) as one."""
    return {name: np.concatenate([t[name] for t in tables]) for name in COLUMNS}


def column(name: str, values) -> np.ndarray:
    """One column in the file's type: text as an object array of str, int64 or float64."""
    if name in TEXT_COLUMNS:
        return np.asarray(values).astype(str).astype(object)
    return np.asarray(values, np.int64 if name in INT_COLUMNS else np.float64)


def typed(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: column(name, columns[name]) for name in COLUMNS}


def write(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> None:
    """Writes the rows of `columns` (every name in `COLUMNS`), replacing the file atomically."""
    path = epath.Path(path)
    kind = check_path(path)
    columns = typed(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name: pa.array(list(columns[name]) if name in TEXT_COLUMNS
                                         else columns[name]) for name in COLUMNS})
        with partial.open("wb") as f:
            pq.write_table(table, f)
    else:
        with partial.open("w") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(COLUMNS)
            out.writerows(zip(*(columns[name].tolist() for name in COLUMNS), strict=True))
    partial.replace(path)


def _read_raw(path: epath.Path, kind: str) -> dict[str, list]:
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with path.open("rb") as f:
                return pq.read_table(f).to_pydict()
        except pa.ArrowException as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{path}: not a readable Parquet file ({reason})") from err
    with path.open() as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty file (no header row)")
    header, body = rows[0], rows[1:]
    if any(len(row) != len(header) for row in body):
        raise ValueError(f"{path}: rows differ in length from the header")
    return {name: [row[i] for row in body] for i, name in enumerate(header)}


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a scores file; a missing file, column or bad value is a ValueError (or
    FileNotFoundError) naming the file."""
    path = epath.Path(path)
    kind = check_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such scores file")
    raw = _read_raw(path, kind)
    missing = [name for name in COLUMNS if name not in raw]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    columns = {}
    for name in COLUMNS:
        try:
            columns[name] = column(name, raw[name])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: column {name} has a bad value "
                             f"({str(err).splitlines()[0]})") from err
    if not columns["label"].size:
        raise ValueError(f"{path}: no rows")
    if not np.isin(columns["label"], (0, 1)).all():
        raise ValueError(f"{path}: column label holds values other than 0 and 1")
    return columns
