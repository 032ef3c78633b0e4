"""`cae-jax prepare`: layouts, sampling, detection + cropping, writer, resume, skips, FF++ clips."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from skimage import data as skdata

from cae_jax import dir_lock
from cae_jax import main as cli
from data_prep import datasets, faces, prepare, video, work, writer
from data_prep.entries import DatasetLayoutError, Options
from tests.crashing_entries import CrashingEntry, SelfKillingEntry, SlowEntry

CANVAS = (240, 180)  # Video frame width, height.
FACE = 96  # Side of the pasted face in the synthetic clips.


POSITIONS = [(50 + 4 * i, 40) for i in range(8)] + [(70, 40), (90, 50)]  # Where faces go.


def _found_everywhere(face: np.ndarray) -> bool:
    detector = faces.make_detector("haar")
    return all(detector.detect(_frame(face, x, y)) for x, y in POSITIONS)


@pytest.fixture(scope="module")
def face_bank() -> list[np.ndarray]:
    """Real faces shipped with scikit-image (the astronaut's, then LFW faces) that the Haar
    detector finds at every position the synthetic clips put them, so counts are exact."""
    astronaut = skdata.astronaut()[30:200, 140:310]  # Her face with some context.
    candidates = [cv2.resize(astronaut, (FACE, FACE), interpolation=cv2.INTER_AREA)]
    for grey in skdata.lfw_subset()[:100]:  # The first 100 are faces.
        face = cv2.resize((grey * 255).astype(np.uint8), (FACE, FACE), cv2.INTER_CUBIC)
        candidates.append(np.stack([face] * 3, -1))
    bank = []
    for face in candidates:
        if len(bank) < 6 and _found_everywhere(face):
            bank.append(face)
    assert len(bank) == 6
    return bank


@pytest.fixture(scope="module")
def fake_bank(face_bank) -> list[np.ndarray]:
    """Face swaps between bank faces that still read as faces everywhere."""
    swaps = [blend(t, s) for t in face_bank for s in face_bank if t is not s]
    found = [f for f in swaps[:15] if _found_everywhere(f)]
    assert len(found) >= 3
    return found[:3]


def _frame(face: np.ndarray, x: int, y: int) -> np.ndarray:
    frame = np.full((CANVAS[1], CANVAS[0], 3), (70, 110, 90), np.uint8)
    frame[y : y + FACE, x : x + FACE] = face
    return frame


def blend(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """A crude face swap: the source's inner face feathered onto the target."""
    mask = np.zeros(target.shape[:2], np.float32)
    cv2.ellipse(mask, (FACE // 2, FACE // 2 + 6), (FACE // 3, FACE // 2 - 12), 0, 0, 360, 1, -1)
    mask = cv2.GaussianBlur(mask, (15, 15), 5)[..., None]
    return (mask * source + (1 - mask) * target).astype(np.uint8)


def write_clip(path: Path, face: np.ndarray | None, frames: int = 8) -> list[tuple[float, float]]:
    """An MJPG clip of a face drifting right; returns the face centre of each frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, CANVAS)
    centres = []
    for i in range(frames):
        x, y = 50 + 4 * i, 40
        if face is None:
            frame = np.full((CANVAS[1], CANVAS[0], 3), 30 * i % 255, np.uint8)
        else:
            frame = _frame(face, x, y)
        out.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        centres.append((x + FACE / 2, y + FACE / 2))
    out.release()
    return centres


def load_split(out: Path, split: str) -> list[dict]:
    builder = tfds.builder_from_directory(str(out))
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


# --- Sampling and decoding --------------------------------------------------------------------


def test_sample_indices_spread_over_whole_video():
    np.testing.assert_array_equal(video.sample_indices(10, 4), [1, 3, 6, 8])
    np.testing.assert_array_equal(video.sample_indices(300, 3), [50, 150, 250])
    np.testing.assert_array_equal(video.sample_indices(3, 32), [0, 1, 2])  # Short: all frames.


def test_read_video_returns_the_sampled_frames(tmp_path):
    path = tmp_path / "levels.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(10):
        out.write(np.full((48, 64, 3), 20 * i + 10, np.uint8))
    out.release()
    frames, indices, fps = video.read_video(path, 4)
    np.testing.assert_array_equal(indices, [1, 3, 6, 8])
    np.testing.assert_allclose([f.mean() for f in frames], [30, 70, 130, 170], atol=2)
    assert fps == 25


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "zero-length"), (b"\x00garbage" * 100, "cannot open")],
)
def test_read_video_names_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(video.UnreadableMediaError, match=f"bad.mp4.*{message}"):
        video.read_video(path, 4)


# --- Cropping, tracking, alignment ------------------------------------------------------------


def test_crop_face_is_the_margin_square_around_the_box():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    crop = faces.crop_face(frame, np.array([100, 50, 180, 130], np.float32), 100, 1.25)
    np.testing.assert_array_equal(crop, frame[40:140, 90:190])  # Side 1.25 * 80 = 100.
    edge = faces.crop_face(frame, np.array([0, 0, 40, 40], np.float32), 80, 2.0)
    np.testing.assert_array_equal(edge[:20], 0)  # Beyond the frame: black.
    np.testing.assert_array_equal(edge[20:, 20:], frame[:60, :60])


def test_alignment_levels_the_eyes():
    frame = np.zeros((200, 200, 3), np.uint8)
    eyes = np.array([[80, 90], [120, 110]], np.float32)  # Tilted by atan(20/40).
    for x, y in eyes.astype(int):
        cv2.circle(frame, (int(x), int(y)), 3, (255, 255, 255), -1)
    crop = faces.crop_face(frame, np.array([60, 60, 140, 140], np.float32), 160, 2.0, eyes)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    left, right = xs < 80, xs >= 80
    assert abs(ys[left].mean() - ys[right].mean()) < 1.0
    # Rotation about the box centre keeps the eye distance: sqrt(40^2 + 20^2).
    assert abs((xs[right].mean() - xs[left].mean()) - np.hypot(40, 20)) < 1.5


def _det(x0, y0, side):
    return faces.Detection(np.array([x0, y0, x0 + side, y0 + side], np.float32), 1.0, None)


def test_tracking_follows_the_first_largest_face():
    first = [_det(0, 0, 50), _det(200, 0, 30)]
    later = [_det(5, 0, 40), _det(195, 0, 80)]  # The other person now looks bigger.
    chosen = faces.pick_faces([first, [], later], track=True)
    assert chosen[0].box[0] == 0 and chosen[1] is None and chosen[2].box[0] == 5
    untracked = faces.pick_faces([first, [], later], track=False)
    assert untracked[2].box[0] == 195


def test_detect_and_crop_centres_the_face(face_bank):
    for face in face_bank:
        frame = _frame(face, 90, 50)
        found = faces.detect_and_crop([frame], "haar", 64, 1.3, track=False)
        assert len(found.kept) == 1
        centre = (found.boxes[0, :2] + found.boxes[0, 2:]) / 2
        np.testing.assert_allclose(centre, (90 + FACE / 2, 50 + FACE / 2), atol=0.15 * FACE)
    empty = faces.detect_and_crop([np.zeros((120, 160, 3), np.uint8)], "haar", 64, 1.3)
    assert empty.crops.shape == (0, 64, 64, 3) and len(empty.kept) == 0


def test_mtcnn_batches_like_single_frames_and_finds_eyes(face_bank):
    """A frame's detections do not depend on its batch, of one size or mixed (frames of the
    same size together): what lets `serve` batch frames of several requests."""
    detector = faces.make_detector("mtcnn")
    frames = [_frame(face, x, y) for face in face_bank[:3] for x, y in POSITIONS[::4]]
    frames[1::3] = [cv2.resize(f, (300, 225)) for f in frames[1::3]]  # Two sizes, interleaved.
    batched = detector.detect_many(frames)
    for frame, in_batch in zip(frames, batched, strict=True):
        alone = detector.detect(frame)
        assert len(alone) == len(in_batch) >= 1
        for one, other in zip(alone, in_batch, strict=True):
            np.testing.assert_array_equal(one.box, other.box)
            np.testing.assert_array_equal(one.eyes, other.eyes)
            assert one.score == other.score
    found = faces.detect_and_crop(
        [_frame(f, 90, 50) for f in face_bank], "mtcnn", 64, 1.3, track=False, align=True
    )
    assert len(found.kept) == len(face_bank)
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    np.testing.assert_allclose(
        centres, [(90 + FACE / 2, 50 + FACE / 2)] * len(face_bank), atol=0.2 * FACE
    )
    for face in (detector.detect(_frame(f, 90, 50))[0] for f in face_bank):
        (lx, ly), (rx, ry) = face.eyes
        assert face.box[0] < lx < rx < face.box[2] and max(ly, ry) < (face.box[1] + face.box[3]) / 2


def test_dlib_baseline_finds_the_faces_when_installed(face_bank):
    pytest.importorskip("dlib")
    found = faces.detect_and_crop(
        [_frame(f, 90, 50) for f in face_bank], "dlib", 64, 1.3, track=False
    )
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    assert len(found.kept) >= len(face_bank) - 1  # HOG misses the odd tightly cropped face.
    np.testing.assert_allclose(
        centres, [(90 + FACE / 2, 50 + FACE / 2)] * len(centres), atol=0.2 * FACE
    )


# --- Layouts ----------------------------------------------------------------------------------


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _official_pairs() -> dict[str, list[list[str]]]:
    return {
        s: json.loads((datasets.SPLITS_DIR / f"{s}.json").read_text())
        for s in ("train", "val", "test")
    }


def test_ffpp_splits_labels_and_unique_ids(tmp_path):
    pairs = _official_pairs()
    (a, b), (c, d), (e, f) = pairs["train"][0], pairs["val"][0], pairs["test"][0]
    real = "original_sequences/youtube/c23/videos"
    _touch(tmp_path, *(f"{real}/{i}.mp4" for i in (a, b, c, e)))
    for method in ("Deepfakes", "NeuralTextures", "FaceShifter"):
        _touch(
            tmp_path,
            *(
                f"manipulated_sequences/{method}/c23/videos/{x}.mp4"
                for x in (f"{a}_{b}", f"{d}_{c}", f"{e}_{f}")
            ),
        )
    _touch(
        tmp_path, f"manipulated_sequences/Deepfakes/c40/videos/{a}_{b}.mp4"
    )  # Other compression.
    opts = Options(methods=("Deepfakes", "NeuralTextures", "FaceShifter", "FaceSwap"))
    entries = datasets.list_entries("ffpp", tmp_path, opts)
    by_id = {e.video_id: e for e in entries}
    assert len(entries) == 4 + 9  # Same file names under three methods stay three videos.
    assert (
        by_id[f"{real}/{a}.mp4"].split == "train" and by_id[f"{real}/{c}.mp4"].split == "validation"
    )
    fake = by_id[f"manipulated_sequences/NeuralTextures/c23/videos/{d}_{c}.mp4"]
    assert (fake.split, fake.label, fake.method, fake.compression) == (
        "validation",
        "fake",
        "NeuralTextures",
        "c23",
    )
    assert by_id[f"manipulated_sequences/FaceShifter/c23/videos/{e}_{f}.mp4"].split == "test"
    assert all(
        e.label == "real" and e.method == "real"
        for e in entries
        if e.video_id.startswith("original")
    )
    assert not any("c40" in e.video_id for e in entries)


def test_ffpp_split_lists_are_official_sizes():
    pairs = _official_pairs()
    assert [len(pairs[s]) for s in ("train", "val", "test")] == [360, 70, 70]
    assert len(datasets.ffpp_split_of_ids()) == 1000


def test_celebdf_test_list_missing_files_and_identity_validation(tmp_path):
    ids = [f"id{i}" for i in range(30)]
    _touch(tmp_path, *(f"Celeb-real/{i}_0000.mp4" for i in ids))
    _touch(tmp_path, *(f"Celeb-synthesis/{i}_id99_0000.mp4" for i in ids))
    _touch(tmp_path, "YouTube-real/00000.mp4", "YouTube-real/00001.mp4")
    (tmp_path / "List_of_testing_videos.txt").write_text(
        "1 Celeb-real/id0_0000.mp4\n0 Celeb-synthesis/id0_id99_0000.mp4\n"
        "1 YouTube-real/00001.mp4\n0 Celeb-synthesis/id7_id8_0009.mp4\n"
    )
    entries = datasets.list_entries("celebdf", tmp_path, Options(val_fraction=0.3))
    by_id = {e.video_id: e for e in entries}
    assert len(entries) == 62 + 1  # The listed but absent video is an entry (skipped later).
    missing = by_id["Celeb-synthesis/id7_id8_0009.mp4"]
    assert (missing.split, missing.label, missing.path.exists()) == ("test", "fake", False)
    assert by_id["YouTube-real/00001.mp4"].split == "test"
    assert by_id["Celeb-synthesis/id0_id99_0000.mp4"].label == "fake"
    val = {i for i in ids[1:] if by_id[f"Celeb-real/{i}_0000.mp4"].split == "validation"}
    assert 3 <= len(val) <= 15  # ~30% of 29 identities, seeded.
    for i in ids[1:]:  # An identity's real and fake videos share a split.
        assert (
            by_id[f"Celeb-real/{i}_0000.mp4"].split
            == by_id[f"Celeb-synthesis/{i}_id99_0000.mp4"].split
        )
    again = datasets.list_entries("celebdf", tmp_path, Options(val_fraction=0.3))
    assert again == entries


def test_dfdc_metadata_groups_fakes_with_originals(tmp_path):
    for part in range(2):
        folder = tmp_path / f"dfdc_train_part_{part}"
        folder.mkdir()
        meta = {}
        for i in range(10):
            meta[f"r{part}{i}.mp4"] = {"label": "REAL", "split": "train"}
            meta[f"f{part}{i}.mp4"] = {
                "label": "FAKE",
                "split": "train",
                "original": f"r{part}{i}.mp4",
            }
            _touch(folder, f"r{part}{i}.mp4", f"f{part}{i}.mp4")
        (folder / "metadata.json").write_text(json.dumps(meta))
    (tmp_path / "dfdc_train_part_1" / "f13.mp4").unlink()  # Listed, missing.
    (tmp_path / "test").mkdir()
    _touch(tmp_path / "test", "t0.mp4", "t1.mp4")
    (tmp_path / "test" / "labels.csv").write_text("filename,label\nt0.mp4,0\nt1.mp4,1\n")
    entries = datasets.list_entries("dfdc", tmp_path, Options(val_fraction=0.5))
    by_id = {e.video_id: e for e in entries}
    assert len(entries) == 42
    assert not by_id["dfdc_train_part_1/f13.mp4"].path.exists()
    assert (by_id["test/t1.mp4"].split, by_id["test/t1.mp4"].label) == ("test", "fake")
    assert by_id["dfdc_train_part_0/f05.mp4"].method == "DFDC"
    for part in range(2):
        for i in range(10):
            pair = (
                by_id[f"dfdc_train_part_{part}/r{part}{i}.mp4"],
                by_id[f"dfdc_train_part_{part}/f{part}{i}.mp4"],
            )
            assert pair[0].split == pair[1].split
    assert {e.split for e in entries} == {"train", "validation", "test"}


def test_dfd_splits_by_actor(tmp_path):
    real = "original_sequences/actors/c23/videos"
    fake = "manipulated_sequences/DeepFakeDetection/c23/videos"
    for actor in range(1, 21):
        _touch(
            tmp_path, f"{real}/{actor:02d}__walking.mp4", f"{fake}/{actor:02d}_05__walking__ABC.mp4"
        )
    entries = datasets.list_entries(
        "dfd", tmp_path, Options(val_fraction=0.2, test_fraction=0.2)
    )
    split_of_actor = {}
    for e in entries:
        assert split_of_actor.setdefault(e.path.name[:2], e.split) == e.split
    assert set(split_of_actor.values()) == {"train", "validation", "test"}
    assert sum(e.label == "fake" for e in entries) == 20


def test_folder_layouts_and_csv_errors(tmp_path):
    _touch(
        tmp_path,
        "real/a.mp4",
        "real/sub/b.png",
        "fake/Deepfakes/c.mp4",
        "fake/d.jpg",
        "fake/notes.txt",
    )
    entries = datasets.list_entries(
        "folder", tmp_path, Options(val_fraction=0, test_fraction=0)
    )
    assert [(e.video_id, e.label, e.method) for e in entries] == [
        ("fake/Deepfakes/c.mp4", "fake", "Deepfakes"),
        ("fake/d.jpg", "fake", "fake"),
        ("real/a.mp4", "real", "real"),
        ("real/sub/b.png", "real", "real"),
    ]
    table = tmp_path / "list.csv"
    table.write_text("path,label,split\nreal/a.mp4,real,val\nfake/d.jpg,1,test\ngone.mp4,0,train\n")
    rows = datasets.list_entries("folder", table, Options())
    assert [(e.video_id, e.label, e.split) for e in rows] == [
        ("fake/d.jpg", "fake", "test"),
        ("gone.mp4", "real", "train"),
        ("real/a.mp4", "real", "validation"),
    ]
    table.write_text("real/a.mp4,maybe\n")
    with pytest.raises(DatasetLayoutError, match=r"list.csv:1: label must be"):
        datasets.list_entries("folder", table, Options())
    with pytest.raises(DatasetLayoutError, match="expected a 'real' folder"):
        datasets.list_entries("folder", tmp_path / "real", Options())


def test_limit_videos_takes_a_seeded_mixed_subset(tmp_path):
    _touch(
        tmp_path,
        *(f"real/r{i:02d}.mp4" for i in range(20)),
        *(f"fake/f{i:02d}.mp4" for i in range(20)),
    )
    entries = datasets.list_entries("folder", tmp_path, Options())
    picked = prepare.subset(entries, 10, seed=0)
    assert len(picked) == 10 and picked == sorted(picked, key=lambda e: e.video_id)
    assert {e.label for e in picked} == {"real", "fake"}  # Not just the first ids.
    assert picked == prepare.subset(entries, 10, seed=0) != prepare.subset(entries, 10, seed=1)
    assert prepare.subset(entries, 0, seed=0) == entries


# --- Writer -----------------------------------------------------------------------------------


def _example(i: int, label: int = 0) -> dict:
    return {
        "image": np.full((8, 8, 3), i, np.uint8),
        "label": label,
        "dataset": "t",
        "method": "real" if label == 0 else "X",
        "compression": "",
        "video_id": f"v{i // 2}",
        "frame_index": i,
        "face_box": np.array([0, 1, 2, 3], np.float32),
        "fps": 25.0,
    }


def test_writer_shards_roundtrip_and_manifest(tmp_path):
    out = writer.write_dataset(
        tmp_path, "t", {"train": [_example(i, i % 2) for i in range(7)], "test": [_example(9)]}, 3
    )
    assert sorted(p.name for p in Path(out).glob("t-*")) == [
        "t-test.tfrecord-00000-of-00001",
        *(f"t-train.tfrecord-0000{i}-of-00003" for i in range(3)),
    ]
    train = load_split(tmp_path, "train")
    assert sorted(int(x["frame_index"]) for x in train) == list(range(7))
    row = next(x for x in train if x["frame_index"] == 3)
    assert (row["label"], row["method"], row["video_id"], row["fps"]) == (1, b"X", b"v1", 25.0)
    np.testing.assert_array_equal(row["image"], np.full((8, 8, 3), 3, np.uint8))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["frames"] == 7 and manifest["splits"]["train"]["videos"] == 4
    assert manifest["splits"]["train"]["fake"] == {"videos": 3, "frames": 3}
    assert manifest["splits"]["train"]["methods"]["real"] == {"videos": 4, "frames": 4}


def test_writer_failure_leaves_previous_dataset_intact(tmp_path):
    writer.write_dataset(tmp_path, "t", {"train": [_example(i) for i in range(4)]}, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken():
        yield _example(0)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        writer.write_dataset(tmp_path, "t", {"train": broken()}, 2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # No tmp files either.
    assert len(load_split(tmp_path, "train")) == 4


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("killed", [False, True], ids=["error", "killed"])
def test_writer_replaces_a_dataset_atomically_at_every_failure_point(tmp_path, monkeypatch, killed):
    writer.write_dataset(tmp_path, "t", {"train": [_example(i) for i in range(4)]}, 2)
    before = _files(tmp_path)
    path_type = type(epath.Path(tmp_path))
    real_rename, real_recover = path_type.rename, writer.recover
    renames = len(before) + 3  # Moving the old files aside, then the new shards in.
    for fail_at in [*range(renames), "metadata"]:
        calls = []

        def rename(self, target, fail_at=fail_at, calls=calls):
            calls.append(target)
            if len(calls) - 1 == fail_at:
                raise OSError("disk gone")
            return real_rename(self, target)

        def metadata(**kwargs):
            raise OSError("disk gone")

        monkeypatch.setattr(path_type, "rename", rename)
        if fail_at == "metadata":
            monkeypatch.setattr(tfds.folder_dataset, "write_metadata", metadata)
        if killed:  # Nothing is undone in the failing process: the next one repairs.
            monkeypatch.setattr(writer, "recover", lambda *a: None)
        with pytest.raises(OSError, match="disk gone"):
            writer.write_dataset(tmp_path, "t", {"train": [_example(i) for i in range(6)]}, 3)
        monkeypatch.undo()
        if killed:
            writer.recover(tmp_path, "t")
        assert _files(tmp_path) == before, fail_at
    writer.write_dataset(tmp_path, "t", {"train": [_example(i) for i in range(6)]}, 3)
    assert len(load_split(tmp_path, "train")) == 6
    assert not writer.previous_dir(epath.Path(tmp_path), "t").exists()
    assert real_recover is writer.recover


def test_writer_keeps_the_previous_dataset_when_nothing_is_written(tmp_path):
    writer.write_dataset(tmp_path, "t", {"train": [_example(i) for i in range(4)]}, 2)
    before = _files(tmp_path)
    with pytest.raises(writer.NothingToWriteError, match="kept as it was"):
        writer.write_dataset(tmp_path, "t", {"train": []}, skipped=[{"video_id": "v9"}])
    after = _files(tmp_path)
    skips = json.loads(after.pop(writer.NOTHING_WRITTEN))
    assert after == before and skips["skipped"] == [{"video_id": "v9"}]
    assert len(load_split(tmp_path, "train")) == 4
    writer.write_dataset(tmp_path, "t", {"train": [_example(1)]})
    assert not (tmp_path / writer.NOTHING_WRITTEN).exists()


# --- End to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory, face_bank, fake_bank) -> tuple[Path, dict]:
    """A `folder` dataset: real clips, blended fakes, a still image, and every kind of bad file."""
    root = tmp_path_factory.mktemp("raw")
    centres = {}
    for i in range(3):
        centres[f"real/r{i}.avi"] = write_clip(root / f"real/r{i}.avi", face_bank[i])
        centres[f"fake/Blend/f{i}.avi"] = write_clip(root / f"fake/Blend/f{i}.avi", fake_bank[i])
    cv2.imwrite(
        str(root / "real/still.png"), cv2.cvtColor(_frame(face_bank[5], 70, 40), cv2.COLOR_RGB2BGR)
    )
    centres["real/still.png"] = [(70 + FACE / 2, 40 + FACE / 2)]
    write_clip(root / "fake/noface.avi", None)
    (root / "fake/empty.avi").write_bytes(b"")
    (root / "fake/corrupt.mp4").write_bytes(b"\x00\x01garbage" * 500)
    whole = (root / "real/r0.avi").read_bytes()
    (root / "real/truncated.avi").write_bytes(whole[: len(whole) // 3])
    rows = [
        f"{p},{p.split('/')[0]},{'test' if p.endswith('1.avi') else 'train'}"
        for p in sorted(centres)
    ]
    rows += [
        "fake/noface.avi,fake,train",
        "fake/empty.avi,fake,train",
        "fake/corrupt.mp4,fake,train",
    ]
    rows += ["real/truncated.avi,real,train", "real/listed_missing.avi,real,test"]
    (root / "list.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root, centres


SETTINGS = work.Settings(frames_per_video=4, image_size=64, margin=1.3, detector="haar")


def _prepare(root: Path, out: Path, **kwargs) -> Path:
    entries = datasets.list_entries("folder", root / "list.csv", Options())
    return Path(prepare.prepare(entries, "mine", out, SETTINGS, examples_per_shard=5, **kwargs))


def test_prepare_folder_counts_labels_crops_and_skips(raw_folder, tmp_path):
    root, centres = raw_folder
    out = _prepare(root, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["video_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {
        "fake/noface.avi",
        "fake/empty.avi",
        "fake/corrupt.mp4",
        "real/listed_missing.avi",
    }
    assert reasons["fake/noface.avi"] == "no face found in 4 sampled frames"
    assert (
        "zero-length" in reasons["fake/empty.avi"] and "corrupt.mp4" in reasons["fake/corrupt.mp4"]
    )
    assert reasons["real/listed_missing.avi"].startswith("listed but missing on disk")
    train = manifest["splits"]["train"]
    assert (train["videos"], train["real"]["videos"], train["fake"]["videos"]) == (6, 4, 2)
    # 4 clips x 4 frames, the still, and the one sampled frame left in the truncated clip.
    assert train["frames"] == 4 * 4 + 1 + 1 and train["methods"]["fake"]["frames"] == 8
    assert manifest["splits"]["test"] == {
        "videos": 2,
        "frames": 8,
        "real": {"videos": 1, "frames": 4},
        "fake": {"videos": 1, "frames": 4},
        "methods": {"fake": {"videos": 1, "frames": 4}, "real": {"videos": 1, "frames": 4}},
    }
    rows = load_split(out, "train") + load_split(out, "test")
    assert len(rows) == 26
    truncated = [r["frame_index"] for r in rows if r["video_id"] == b"real/truncated.avi"]
    assert truncated == [1]
    for row in rows:
        video_id = row["video_id"].decode()
        assert row["label"] == (video_id.startswith("fake/"))
        assert row["image"].shape == (64, 64, 3)
        if video_id == "real/truncated.avi":
            continue  # Its last decoded frame may be cut off mid-image.
        cx, cy = centres[video_id][row["frame_index"]]
        box = row["face_box"]  # LFW crops sit up to ~15% off their face's centre.
        assert (
            abs((box[0] + box[2]) / 2 - cx) < 0.2 * FACE
            and abs((box[1] + box[3]) / 2 - cy) < 0.2 * FACE
        )
    assert {r["frame_index"] for r in rows if r["video_id"] == b"real/r0.avi"} == {1, 3, 5, 7}
    # preview.png: a row per split (train, test) of 8 cells of 128 px + 4 px frames; train
    # shows its 4 real videos (green), then its 2 fakes (red), then blanks.
    preview = cv2.cvtColor(cv2.imread(str(out / "preview.png")), cv2.COLOR_BGR2RGB)
    assert preview.shape == (2 * 136, 8 * 136, 3)
    assert [tuple(preview[1, 136 * i + 1]) for i in range(7)] == [(0, 170, 0)] * 4 + [
        (220, 0, 0)
    ] * 2 + [(255, 255, 255)]


def test_prepare_resumes_and_matches_an_uninterrupted_run(raw_folder, tmp_path, monkeypatch):
    root, _ = raw_folder
    straight = _prepare(root, tmp_path / "straight")

    calls = []
    real_extract = faces.extract_faces

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # As if the run were killed here.
        calls.append(args[0])
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(faces, "extract_faces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, tmp_path / "resumed")
    assert not list((tmp_path / "resumed").glob("mine-*"))  # Nothing readable yet.
    done_before = list(calls)
    calls.clear()
    monkeypatch.setattr(
        faces, "extract_faces", lambda *a, **k: calls.append(a[0]) or real_extract(*a, **k)
    )
    resumed = _prepare(root, tmp_path / "resumed")
    assert not set(map(str, calls)) & set(map(str, done_before))  # Finished videos not redone.
    shards = sorted(p.name for p in straight.glob("mine-*"))
    assert shards == sorted(p.name for p in resumed.glob("mine-*")) and len(shards) == 6
    for name in shards:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes()
    calls.clear()
    _prepare(root, tmp_path / "resumed")  # A finished run re-run: only rewrites.
    assert calls == []


def test_resumed_shards_are_byte_identical_to_another_process_run(
    raw_folder, tmp_path, monkeypatch
):
    """Record bytes do not depend on the process that wrote them (protobuf writes a feature
    map in an order that varies per process unless told to sort it)."""
    root, _ = raw_folder
    options = ["--root", str(root / "list.csv"), "--frames-per-video", "4", "--image-size",
               "64", "--detector", "haar", "--examples-per-shard", "5", "--workers", "1"]
    straight = _run_prepare("folder", "--out", str(tmp_path / "straight"), *options)
    assert straight.returncode == 0, straight.stderr
    real_extract = faces.extract_faces
    calls = []

    def killed_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real_extract(*args, **kwargs)

    argv = ["prepare", "folder", "--out", str(tmp_path / "resumed"), *options]
    monkeypatch.setattr(faces, "extract_faces", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    monkeypatch.undo()
    assert cli.main(argv) == 0
    shards = sorted(p.name for p in (tmp_path / "straight").glob("folder-*"))
    assert len(shards) == 6
    assert sorted(p.name for p in (tmp_path / "resumed").glob("folder-*")) == shards
    for name in shards:
        assert (tmp_path / "straight" / name).read_bytes() == (
            tmp_path / "resumed" / name).read_bytes()


def test_prepare_process_pool_matches_inline(raw_folder, tmp_path):
    root, _ = raw_folder
    inline = _prepare(root, tmp_path / "inline")
    pooled = _prepare(root, tmp_path / "pooled", workers=2)
    for shard in inline.glob("mine-*"):
        assert shard.read_bytes() == (pooled / shard.name).read_bytes()


def test_pool_survives_a_file_that_kills_its_worker(raw_folder, tmp_path):
    root, _ = raw_folder
    good = [e for e in datasets.list_entries("folder", root / "list.csv", Options())]
    good = [e for e in good if e.video_id in ("real/r0.avi", "fake/Blend/f0.avi")]
    crash = CrashingEntry(root / "real/r2.avi", "real/crash.avi", "real", "real", "train")
    out = Path(prepare.prepare([*good, crash], "mine", tmp_path, SETTINGS, workers=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["videos"] == 2
    assert manifest["splits"]["train"]["frames"] == 8
    (skipped,) = manifest["skipped"]
    assert skipped["video_id"] == "real/crash.avi"
    assert skipped["reason"].startswith(f"crashed its worker process {work.MAX_ATTEMPTS} times")


def test_pool_charges_each_of_several_crashing_files(raw_folder, tmp_path):
    root, _ = raw_folder
    crashes = [CrashingEntry(root / "real/r2.avi", f"real/crash{i}.avi", "real", "real", "train")
               for i in range(3)]
    good = [e for e in datasets.list_entries("folder", root / "list.csv", Options())
            if e.video_id == "real/r0.avi"]
    out = Path(prepare.prepare([*crashes, *good], "mine", tmp_path, SETTINGS, workers=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["frames"] == 4
    reasons = {s["video_id"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(reasons) == [f"real/crash{i}.avi" for i in range(3)]
    for reason in reasons.values():
        assert reason.startswith(f"crashed its worker process {work.MAX_ATTEMPTS} times")


def test_only_the_video_whose_process_died_is_charged_the_crash(raw_folder, tmp_path):
    root, _ = raw_folder
    work_dir = str(tmp_path / prepare.WORK_DIR)
    slow = SlowEntry(root / "real/r0.avi", "real/slow.avi", "real", "real", "train",
                     other="real/crash.avi", work_dir=work_dir)
    crash = SelfKillingEntry(root / "real/r2.avi", "real/crash.avi", "real", "real", "train",
                             other="real/slow.avi", work_dir=work_dir)
    out = Path(prepare.prepare([slow, crash], "mine", tmp_path, SETTINGS, workers=2))
    manifest = json.loads((out / "manifest.json").read_text())
    (skipped,) = manifest["skipped"]
    assert skipped["video_id"] == "real/crash.avi"
    assert skipped["reason"].startswith(f"crashed its worker process {work.MAX_ATTEMPTS} times")
    assert manifest["splits"]["train"]["videos"] == 1  # The slow video, in flight twice.
    assert manifest["splits"]["train"]["frames"] == 4
    assert not list(Path(work_dir).glob("*.attempt*"))


def test_transient_failure_is_reported_not_cached_and_retried(raw_folder, tmp_path, monkeypatch):
    root, _ = raw_folder
    real_extract = faces.extract_faces

    def flaky(path, *args, **kwargs):
        if Path(path).name == "r0.avi":
            raise OSError(errno.EIO, "Input/output error")
        return real_extract(path, *args, **kwargs)

    monkeypatch.setattr(faces, "extract_faces", flaky)
    out = _prepare(root, tmp_path / "o")
    skipped = {s["video_id"]: s for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert skipped["real/r0.avi"]["retry"] is True
    assert skipped["real/r0.avi"]["reason"] == (
        f"failed (retried on the next run): {root / 'real/r0.avi'}: OSError: "
        "[Errno 5] Input/output error"
    )
    assert "retry" not in skipped["fake/corrupt.mp4"]  # Permanent media errors stay cached.
    monkeypatch.undo()
    out = _prepare(root, tmp_path / "o")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "real/r0.avi" not in {s["video_id"] for s in manifest["skipped"]}
    frames = [r["frame_index"] for r in load_split(out, "train") if r["video_id"] == b"real/r0.avi"]
    assert sorted(frames) == [1, 3, 5, 7]


def test_unreadable_video_is_retried_not_cached(raw_folder, tmp_path, monkeypatch):
    """A video the run may not read (chmod 000) is a failure not its own: once readable again,
    the next run crops it. As root, whom chmod does not stop, the read is refused here."""
    root, _ = raw_folder
    locked = tmp_path / "raw"
    shutil.copytree(root, locked)
    clip = locked / "real/r0.avi"
    if os.geteuid() == 0:
        def denied(path, *args, **kwargs):
            if Path(path) == clip:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(video, "open", denied, raising=False)
    else:
        clip.chmod(0)
    out = _prepare(locked, tmp_path / "o")
    skipped = {s["video_id"]: s for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert skipped["real/r0.avi"]["retry"] is True
    assert skipped["real/r0.avi"]["reason"] == (
        f"failed (retried on the next run): {clip}: PermissionError: [Errno 13] "
        f"Permission denied: '{clip}'")
    monkeypatch.undo()
    clip.chmod(0o644)
    out = _prepare(locked, tmp_path / "o")
    assert "real/r0.avi" not in {
        s["video_id"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    frames = [r["frame_index"] for r in load_split(out, "train") if r["video_id"] == b"real/r0.avi"]
    assert sorted(frames) == [1, 3, 5, 7]


def test_full_disk_while_caching_names_the_path_and_leaves_no_temporary(
    raw_folder, tmp_path, monkeypatch, capsys
):
    root, _ = raw_folder
    path_type = type(epath.Path(tmp_path))
    real_write = path_type.write_bytes

    def full_disk(self, data):
        if ".npz.tmp-" in self.name:
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(path_type, "write_bytes", full_disk)
    out = tmp_path / "o"
    argv = ["prepare", "folder", "--root", str(root / "list.csv"), "--out", str(out),
            "--workers", "1", "--detector", "haar", "--frames-per-video", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"cannot write {re.escape(str(out))}/\.work/[0-9a-f]{{24}}\.npz \(for \S+\): "
        "No space left on device", err
    ), err
    left = [p.name for p in (out / ".work").iterdir() if ".tmp-" in p.name or "attempt" in p.name]
    assert not left
    monkeypatch.undo()
    assert cli.main(argv) == 0


def test_missing_or_corrupt_cached_crops_are_named_and_redone(
    raw_folder, tmp_path, monkeypatch, caplog
):
    root, _ = raw_folder
    out = _prepare(root, tmp_path / "o")
    shards = {p.name: p.read_bytes() for p in out.glob("mine-*")}
    cache = out / prepare.WORK_DIR
    (cache / f"{work.cache_key('real/r0.avi')}.npz").unlink()
    npz = cache / f"{work.cache_key('fake/Blend/f0.avi')}.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    calls = []
    real_extract = faces.extract_faces
    monkeypatch.setattr(
        faces, "extract_faces", lambda *a, **k: calls.append(a[0]) or real_extract(*a, **k)
    )
    with caplog.at_level(logging.WARNING):
        again = _prepare(root, tmp_path / "o")
    assert sorted(Path(c).name for c in calls) == ["f0.avi", "r0.avi"]
    for video_id in ("real/r0.avi", "fake/Blend/f0.avi"):
        assert f"cached crops of {video_id} (" in caplog.text
    assert {p.name: p.read_bytes() for p in again.glob("mine-*")} == shards


def _face_rows(out: Path, video_id: str) -> list[bytes]:
    rows = [r for split in ("train", "test") for r in load_split(out, split)]
    return [r["image"].tobytes() for r in rows if r["video_id"] == video_id.encode()]


def test_cache_is_not_reused_for_another_file_of_the_same_id(
    raw_folder, face_bank, tmp_path, capsys
):
    """Another --root into the same --out, or a file edited in place, gives that file's faces;
    the run says what it reused."""
    root, _ = raw_folder
    other = tmp_path / "other"
    shutil.copytree(root, other)
    write_clip(other / "real/r0.avi", face_bank[4])  # Same id, another person.
    fresh = _face_rows(_prepare(other, tmp_path / "fresh"), "real/r0.avi")
    capsys.readouterr()
    first = _face_rows(_prepare(root, tmp_path / "o"), "real/r0.avi")
    assert first != fresh
    assert "faces: 0 videos reused" in capsys.readouterr().err
    assert _face_rows(_prepare(other, tmp_path / "o"), "real/r0.avi") == fresh
    # Every listed file is in another folder now: none is taken from the cache.
    assert ("faces: 0 videos reused from {}".format(tmp_path / "o" / prepare.WORK_DIR)
            in capsys.readouterr().err)
    write_clip(other / "real/r0.avi", face_bank[2])  # Edited in place.
    edited = _face_rows(_prepare(other, tmp_path / "o"), "real/r0.avi")
    assert edited not in (first, fresh)
    assert edited == _face_rows(_prepare(other, tmp_path / "edited"), "real/r0.avi")
    err = capsys.readouterr().err
    # 12 listed: the edited clip and the missing file are cropped (tried), the rest reused.
    assert ("faces: 10 videos reused from {} (same file, size and modification time), "
            "2 cropped (1 of them again: cached from another source, or by a release that "
            "did not record it)".format(
                tmp_path / "o" / prepare.WORK_DIR)) in err


def test_cache_of_a_release_without_sources_is_cropped_again(
    raw_folder, tmp_path, monkeypatch, capsys
):
    root, _ = raw_folder
    out = _prepare(root, tmp_path / "o")
    shards = {p.name: p.read_bytes() for p in out.glob("mine-*")}
    done = out / prepare.WORK_DIR / f"{work.cache_key('real/r0.avi')}.json"
    summary = json.loads(done.read_text())
    del summary["source"]  # As the earlier release wrote it.
    done.write_text(json.dumps(summary))
    calls = []
    real_extract = faces.extract_faces
    monkeypatch.setattr(
        faces, "extract_faces", lambda *a, **k: calls.append(a[0]) or real_extract(*a, **k)
    )
    capsys.readouterr()
    again = _prepare(root, tmp_path / "o")
    assert [Path(c).name for c in calls] == ["r0.avi"]
    assert "2 cropped (1 of them again" in capsys.readouterr().err  # And the missing file.
    assert {p.name: p.read_bytes() for p in again.glob("mine-*")} == shards
    assert json.loads(done.read_text())["source"] == work.source_of(
        next(e for e in datasets.list_entries("folder", root / "list.csv", Options())
             if e.video_id == "real/r0.avi"))


def test_cache_refuses_other_settings(raw_folder, tmp_path):
    root, _ = raw_folder
    _prepare(root, tmp_path / "o")
    entries = datasets.list_entries("folder", root / "list.csv", Options())
    with pytest.raises(ValueError, match="made with"):
        prepare.prepare(
            entries, "mine", tmp_path / "o", work.Settings(frames_per_video=8, detector="haar")
        )


def test_beam_runner_writes_the_same_records(raw_folder, tmp_path):
    pytest.importorskip("apache_beam")
    root, _ = raw_folder
    local = _prepare(root, tmp_path / "local")
    beam = _prepare(root, tmp_path / "beam", runner="beam", beam_options=["--runner=DirectRunner"])

    def records(out):
        return sorted(
            (r["video_id"], r["frame_index"], r["image"].tobytes(), r["label"])
            for split in ("train", "test")
            for r in load_split(out, split)
        )

    assert records(beam) == records(local)
    # One manifest, skips and all (no face, empty, corrupt, missing: every kind of failure).
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (local, beam)]
    assert manifests[0] == manifests[1]
    assert len(manifests[0]["skipped"]) == 4


def test_cli_prepare_and_layout_error(raw_folder, tmp_path, capsys):
    root, _ = raw_folder
    argv = ["prepare", "folder", "--root", str(root / "list.csv"), "--out", str(tmp_path / "cli")]
    options = [
        "--frames-per-video",
        "2",
        "--image-size",
        "32",
        "--workers",
        "1",
        "--detector",
        "haar",
    ]
    assert cli.main([*argv, *options]) == 0
    train = json.loads((tmp_path / "cli" / "manifest.json").read_text())["splits"]["train"]
    assert train["frames"] >= 9  # 4 clips x 2 frames and the still (+ the truncated clip's).
    assert f"train: {train['videos']} videos, {train['frames']} frames" in capsys.readouterr().out
    assert cli.main(["prepare", "celebdf", "--root", str(root), "--out", str(tmp_path / "x")]) == 2
    assert "List_of_testing_videos.txt" in capsys.readouterr().err
    (root / "bad.csv").write_text("fake/noface.avi,fake\nfake/empty.avi,fake\n")
    argv = ["prepare", "folder", "--root", str(root / "bad.csv"), "--out", str(tmp_path / "bad")]
    assert cli.main([*argv, "--workers", "1", "--detector", "haar"]) == 2
    assert "every split is empty" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    assert sorted(s["video_id"] for s in manifest["skipped"]) == [
        "fake/empty.avi",
        "fake/noface.avi",
    ]
    assert not list((tmp_path / "bad").glob("folder-*")) and manifest["splits"] == {}
    assert cli.main([*argv, "--workers", "1", "--frames-per-video", "3"]) == 2
    assert "holds crops made with" in capsys.readouterr().err


# --- Real FaceForensics++ clips ---------------------------------------------------------------


def test_ffpp_mini_lands_in_official_splits_with_faces(ffpp_mini, tmp_path):
    split_of = {}
    for file_stem, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        for pair in json.loads((ffpp_mini / "splits" / f"{file_stem}.json").read_text()):
            split_of.update(dict.fromkeys(pair, split))
    entries = datasets.list_entries("ffpp", ffpp_mini, Options())
    out = Path(
        prepare.prepare(entries, "ffpp", tmp_path, work.Settings(frames_per_video=2, image_size=96))
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == []
    detector = faces.make_detector("haar")
    seen = set()
    for split in manifest["splits"]:
        for row in load_split(out, split):
            video_id = row["video_id"].decode()
            seen.add(video_id)
            stem = Path(video_id).stem
            assert split == split_of[stem.split("_")[0]]
            assert row["label"] == video_id.startswith("manipulated_sequences")
            assert row["method"].decode() == (
                "real" if row["label"] == 0 else video_id.split("/")[1]
            )
            # The crop shows a face filling most of it, centred.
            found = detector.detect(cv2.resize(row["image"], (192, 192)))
            assert found, f"no face in crop of {video_id} frame {row['frame_index']}"
            box = max(found, key=lambda d: d.box[2] - d.box[0]).box
            assert np.all(np.abs((box[:2] + box[2:]) / 2 - 96) < 30)
    on_disk = {p.relative_to(ffpp_mini).as_posix() for p in ffpp_mini.rglob("*.mp4")}
    assert seen == on_disk


@pytest.mark.parametrize("flag, value, wanted", [
    ("--examples-per-shard", "0", "an integer >= 1"),
    ("--examples-per-shard", "-3", "an integer >= 1"),
    ("--frames-per-video", "0", "an integer >= 1"), ("--image-size", "x", "an integer >= 1"),
    ("--workers", "0", "an integer >= 1"), ("--limit-videos", "-1", "an integer >= 0"),
    ("--margin", "-1.3", "a finite number > 0"), ("--margin", "0", "a finite number > 0"),
    ("--margin", "nan", "a finite number > 0"), ("--margin", "inf", "a finite number > 0"),
    ("--val-fraction", "2", "a number in [0, 1]"), ("--test-fraction", "-1", "a number in [0, 1]"),
    ("--test-fraction", "nan", "a number in [0, 1]"),
])
def test_number_flags_out_of_range_are_refused_before_any_work(flag, value, wanted, tmp_path,
                                                               capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "folder", "--root", str(tmp_path / "absent"),
                  "--out", str(tmp_path / "out"), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be {wanted}, got {value!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _run_prepare(*argv: str) -> subprocess.CompletedProcess:
    """The real `cae-jax prepare` command, as a user runs it."""
    script = Path(sys.executable).with_name("cae-jax")
    return subprocess.run([str(script), "prepare", *argv], capture_output=True, text=True,
                          timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command's error: exit 2, no traceback, the last stderr line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_fractions_adding_up_past_one_are_refused_naming_both(tmp_path, capsys):
    argv = ["prepare", "folder", "--root", str(tmp_path / "absent"), "--out",
            str(tmp_path / "out"), "--val-fraction", "0.6", "--test-fraction", "0.5"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "cae-jax prepare: --val-fraction 0.6 and --test-fraction 0.5 add up to more than 1: "
        "no video would be left to train on\n")
    assert not (tmp_path / "out").exists()


def test_nan_margin_is_refused_by_the_command_every_time(raw_folder, tmp_path):
    """Once `--margin nan` wrote a cache whose settings no run could match (nan != nan); now
    the command refuses it by name, the first time and the second, and writes nothing."""
    root, _ = raw_folder
    argv = ["folder", "--root", str(root / "list.csv"), "--out", str(tmp_path / "o"),
            "--margin", "nan", "--workers", "1", "--detector", "haar"]
    for _ in range(2):
        assert _one_line_error(_run_prepare(*argv)) == (
            "cae-jax prepare: error: argument --margin: must be a finite number > 0, got 'nan'")
    assert not (tmp_path / "o").exists()


def _small_list(root: Path, folder: Path) -> Path:
    """A CSV of two clips of the raw folder (a quick real run)."""
    listing = folder / "two.csv"
    listing.write_text("".join(f"{root / p},{p.split('/')[0]},train\n"
                               for p in ("real/r0.avi", "fake/Blend/f0.avi")))
    return listing


def test_out_that_cannot_be_written_is_one_line_naming_it(raw_folder, tmp_path):
    root, _ = raw_folder
    (tmp_path / "file").write_text("")
    # Root may write anywhere chmod allows nothing: /sys refuses it a new folder.
    locked = Path("/sys/cae-jax-out") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        locked.parent.mkdir()
        locked.parent.chmod(0o500)
    options = ["--workers", "1", "--detector", "haar", "--frames-per-video", "2"]
    listing = _small_list(root, tmp_path)
    a_file, under_file = tmp_path / "file", tmp_path / "file" / "out"
    for out, wanted in ((locked, f"--out {locked}: cannot create it ("),
                        (a_file, f"--out {a_file} is a file, not a directory"),
                        (under_file, f"--out {under_file}: cannot create it (")):
        line = _one_line_error(_run_prepare("folder", "--root", str(listing), "--out", str(out),
                                            *options))
        assert line.startswith(f"cae-jax prepare: {wanted}"), line


def test_root_that_is_not_a_csv_is_one_line_naming_it(raw_folder, tmp_path):
    root, _ = raw_folder
    still = root / "real/still.png"
    line = _one_line_error(_run_prepare("folder", "--root", str(still), "--out",
                                        str(tmp_path / "o")))
    assert line.startswith(f"cae-jax prepare: {still}: a file, but not a CSV of "
                           "path,label[,split] rows ("), line
    assert not (tmp_path / "o").exists()


def test_full_disk_while_writing_shards_is_one_line_and_leaves_no_temporary(
    raw_folder, tmp_path, monkeypatch, capsys
):
    root, _ = raw_folder
    out = tmp_path / "o"
    argv = ["prepare", "folder", "--root", str(_small_list(root, tmp_path)), "--out", str(out),
            "--workers", "1", "--detector", "haar", "--frames-per-video", "2"]
    assert cli.main(argv) == 0
    shards = {p.name: p.read_bytes() for p in out.glob("folder-*")}
    real_writer = tf.io.TFRecordWriter

    class FullDisk(real_writer):
        def write(self, record):
            raise tf.errors.ResourceExhaustedError(
                None, None, f"{out}/.folder-train-00000.tmp-x; No space left on device")

    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"cae-jax prepare: cannot write the dataset to {out}: "
        f"{out}/.folder-train-00000.tmp-x; No space left on device")
    assert not list(out.glob(".*tmp*"))
    assert {p.name: p.read_bytes() for p in out.glob("folder-*")} == shards  # Kept whole.
    monkeypatch.undo()
    assert cli.main(argv) == 0


def test_second_prepare_into_one_out_is_refused_and_a_stale_lock_taken_over(raw_folder, tmp_path):
    root, _ = raw_folder
    out = tmp_path / "o"
    out.mkdir()
    lock = out / dir_lock.LOCK_FILE
    argv = ["folder", "--root", str(_small_list(root, tmp_path)), "--out", str(out),
            "--workers", "1", "--detector", "haar", "--frames-per-video", "2"]
    with dir_lock.hold(out, "cae-jax prepare"):  # A run in progress: this process.
        line = _one_line_error(_run_prepare(*argv))
    assert line == (
        f"cae-jax prepare: {out} is in use by cae-jax prepare (process {os.getpid()} on "
        f"{socket.gethostname()}): wait for it to finish, or use another directory; if no such "
        f"run is going on, remove {lock}")
    assert not list(out.iterdir())
    # A run killed while holding it leaves the lock behind.
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal; from cae_jax import dir_lock\n"
        f"with dir_lock.hold({str(out)!r}, 'cae-jax prepare'): os.kill(os.getpid(), signal.SIGKILL)"
    )])
    assert killed.returncode == -9 and lock.exists()
    holder = json.loads(lock.read_text())["pid"]
    result = _run_prepare(*argv)
    assert result.returncode == 0, result.stderr
    assert (f"cae-jax prepare: {lock}: taking over the lock of process {holder} "
            "(cae-jax prepare), which is no longer running") in result.stderr
    assert not lock.exists()  # Released at the end.
