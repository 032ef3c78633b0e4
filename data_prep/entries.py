"""What a dataset listing is made of: `Entry` (one video or image), `Options`, the layout error,
and the deterministic carving of splits.

Where a dataset has no official validation (or test) split, one is carved out by a seeded hash
of identity, so a person's real and fake videos never straddle two splits and every machine
carves the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

from etils.epath import Path

from data_prep import video

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
COMPRESSIONS = ("c0", "c23", "c40")
REAL = "real"


class DatasetLayoutError(Exception):
    """The raw folder does not have the expected layout or its metadata is malformed."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One video or image to prepare."""

    path: Path  # Absolute path; may not exist (then it is reported as missing).
    video_id: str  # Path relative to the dataset root (posix): unique within the dataset.
    label: str  # "real" or "fake".
    method: str  # "real" for pristine media, else the manipulation's name.
    split: str  # "train", "validation" or "test".
    compression: str = ""
    frames: tuple[str, ...] = ()  # A video as frame files (DeepfakeBench); path: their folder.

    @property
    def is_image(self) -> bool:
        return video.is_image(self.path)


@dataclasses.dataclass(frozen=True)
class Options:
    """Dataset selection options shared by the builders."""

    compression: str = "c23"  # FF++ / DFD compression level.
    methods: tuple[str, ...] = FFPP_METHODS  # FF++ manipulations to include.
    val_fraction: float = 0.1  # Identities moved to validation where no official split exists.
    test_fraction: float = 0.1  # Identities moved to test where no official test split exists.
    seed: int = 0  # Seed of those carve-outs.
    dfb_json: str = ""  # DeepfakeBench: the dataset JSON, or the folder holding NAME.json.
    dfb_name: str = ""  # DeepfakeBench: the dataset's name (the JSON's top-level key).


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (the same on every machine)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def carve(
    entries: list[Entry],
    group_of: Callable[[Entry], str],
    fractions: dict[str, float],
    seed: int,
    from_split: str = "train",
) -> list[Entry]:
    """Moves whole groups (identities) of `from_split` into other splits by seeded hash."""
    out = []
    for e in entries:
        if e.split == from_split:
            u, edge = unit_hash(seed, group_of(e)), 0.0
            for split, fraction in fractions.items():
                if edge <= u < edge + fraction:
                    e = dataclasses.replace(e, split=split)
                edge += fraction
        out.append(e)
    return out
