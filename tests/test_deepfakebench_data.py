"""`cae-jax prepare deepfakebench`: a synthetic DeepfakeBench tree (PNG frames + dataset JSON in
the schema of their preprocessing/rearrange.py) -> records, labels, splits, ids and skips."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cae_jax import main as cli
from data_prep import datasets, faces, prepare, work
from data_prep.entries import DatasetLayoutError, Options

SIZE = 40  # Side of the synthetic frames (theirs are 256).


def frame_image(key: str) -> np.ndarray:
    """A distinct RGB frame per key (a checker pattern of seeded colours)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    cells = rng.integers(0, 256, (4, 4, 3), np.uint8)
    return np.kron(cells, np.ones((SIZE // 4, SIZE // 4, 1), np.uint8))


def write_video(rgb: Path, folder: str, numbers: list[int], style: str = "windows") -> list[str]:
    """Writes PNG frames named by frame number; returns the paths as their JSON lists them."""
    listed = []
    for n in numbers:
        path = rgb / folder / f"{n:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(frame_image(f"{folder}/{n}"), cv2.COLOR_RGB2BGR))
        text = {"windows": f"{folder}/{n:03d}.png".replace("/", "\\"),
                "dotted": f"./{folder}/{n:03d}.png", "absolute": str(path)}[style]
        listed.append(text)
    return listed[::-1]  # Their JSON lists os.scandir order: not sorted.


@pytest.fixture(scope="module")
def dfb_tree(tmp_path_factory) -> tuple[Path, Path]:
    """rgb/ (their rgb_dir) and dataset_json/ with FaceForensics++.json and Celeb-DF-v2.json."""
    base = tmp_path_factory.mktemp("dfb")
    rgb, json_dir = base / "rgb", base / "dataset_json"
    json_dir.mkdir()
    ff = "FaceForensics++"
    real = f"{ff}/original_sequences/youtube/c23/frames"
    df = f"{ff}/manipulated_sequences/Deepfakes/c23/frames"
    nt = f"{ff}/manipulated_sequences/NeuralTextures/c23/frames"

    def video(label, frames):
        return {"label": label, "frames": frames}

    real_000 = write_video(rgb, f"{real}/000", [0, 5, 10, 15, 20])  # 5 frames, 4 taken.
    real_001 = write_video(rgb, f"{real}/001", [1, 2], "dotted")
    real_001.append("./" + f"{real}/001/009.png")  # Listed, missing on disk.
    df_000 = write_video(rgb, f"{df}/000_003", [0, 3], "absolute")
    (rgb / f"{df}/000_003/003.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # Corrupt.
    nt_000 = write_video(rgb, f"{nt}/000_003", [0, 1])  # Same folder name as FF-DF's.
    df_gone = [f"{df}/001_870/000.png".replace("/", "\\")]  # The whole folder is missing.
    c40 = write_video(rgb, f"{ff}/original_sequences/youtube/c40/frames/000", [0])
    ffpp = {ff: {
        "FF-real": {
            "train": {"c23": {"000": video("FF-real", real_000)}, "c40": {"000": video(
                "FF-real", c40)}},
            "val": {"c23": {"001": video("FF-real", real_001)}, "c40": {}},
            "test": {"c23": {}, "c40": {}},
        },
        "FF-DF": {
            "train": {"c23": {"000_003": video("FF-DF", df_000)}},
            "val": {"c23": {}},
            "test": {"c23": {"001_870": video("FF-DF", df_gone)}},
        },
        "FF-NT": {
            "train": {"c23": {"000_003": video("FF-NT", nt_000)}},
            "val": {"c23": {}},
            "test": {"c23": {}},
        },
    }}
    (json_dir / f"{ff}.json").write_text(json.dumps(ffpp))
    celeb_real = write_video(rgb, "Celeb-DF-v2/Celeb-real/frames/id0_0000", [0, 1])
    celeb_fake = write_video(rgb, "Celeb-DF-v2/Celeb-synthesis/frames/id0_id1_0000", [0, 1])
    celeb_train = write_video(rgb, "Celeb-DF-v2/Celeb-real/frames/id2_0000", [0])
    celeb = {"Celeb-DF-v2": {  # As rearrange.py writes it: test videos under train and val too.
        "CelebDFv2_real": {
            "train": {"id0_0000": video("CelebDFv2_real", celeb_real),
                      "id2_0000": video("CelebDFv2_real", celeb_train)},
            "val": {"id0_0000": video("CelebDFv2_real", celeb_real)},
            "test": {"id0_0000": video("CelebDFv2_real", celeb_real)},
        },
        "CelebDFv2_fake": {
            "train": {"id0_id1_0000": video("CelebDFv2_fake", celeb_fake)},
            "val": {"id0_id1_0000": video("CelebDFv2_fake", celeb_fake)},
            "test": {"id0_id1_0000": video("CelebDFv2_fake", celeb_fake)},
        },
    }}
    (json_dir / "Celeb-DF-v2.json").write_text(json.dumps(celeb))
    return rgb, json_dir


def options(json_dir: Path, name: str, compression: str = "c23") -> Options:
    return Options(compression=compression, dfb_json=str(json_dir), dfb_name=name)


def load(out: Path) -> dict[str, list[dict]]:
    builder = tfds.builder_from_directory(str(out))
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
            for split in builder.info.splits}


def test_entries_follow_their_splits_labels_and_unique_ids(dfb_tree):
    rgb, json_dir = dfb_tree
    entries = datasets.list_entries("deepfakebench", rgb, options(json_dir, "FaceForensics++"))
    table = {e.video_id: (e.split, e.label, e.method, e.compression) for e in entries}
    assert table == {
        "FF-real/c23/000": ("train", "real", "FF-real", "c23"),
        "FF-real/c23/001": ("validation", "real", "FF-real", "c23"),
        "FF-DF/c23/000_003": ("train", "fake", "FF-DF", "c23"),
        "FF-NT/c23/000_003": ("train", "fake", "FF-NT", "c23"),
        "FF-DF/c23/001_870": ("test", "fake", "FF-DF", "c23"),
    }
    first = next(e for e in entries if e.video_id == "FF-real/c23/000")
    assert [Path(f).name for f in first.frames] == [f"{n:03d}.png" for n in (0, 5, 10, 15, 20)]
    assert first.frames[0] == str(rgb / "FaceForensics++/original_sequences/youtube/c23/frames"
                                  / "000/000.png")
    c40 = datasets.list_entries("deepfakebench", rgb, options(json_dir, "FaceForensics++", "c40"))
    assert [e.video_id for e in c40] == ["FF-real/c40/000"]
    # Celeb-DF: their val copies test and train holds every video; each is kept once.
    celeb = datasets.list_entries("deepfakebench", rgb, options(json_dir / "Celeb-DF-v2.json", ""))
    assert {e.video_id: (e.split, e.label) for e in celeb} == {
        "CelebDFv2_real/c23/id0_0000": ("test", "real"),
        "CelebDFv2_fake/c23/id0_id1_0000": ("test", "fake"),
        "CelebDFv2_real/c23/id2_0000": ("train", "real"),
    }


def test_bad_json_names_the_file_and_problem(dfb_tree, tmp_path):
    rgb, json_dir = dfb_tree
    with pytest.raises(DatasetLayoutError, match="no dataset 'DFDC'"):
        datasets.list_entries("deepfakebench", rgb, options(json_dir / "Celeb-DF-v2.json", "DFDC"))
    with pytest.raises(DatasetLayoutError, match=r"'raw' \(it has \['c23', 'c40'\]"):
        datasets.list_entries("deepfakebench", rgb, options(json_dir, "FaceForensics++", "c0"))
    with pytest.raises(DatasetLayoutError, match="a JSON folder needs --name"):
        datasets.list_entries("deepfakebench", rgb, options(json_dir, ""))
    bad = tmp_path / "X.json"
    bad.write_text(json.dumps({"X": {"Mystery": {"train": {"v": {"frames": []}}}}}))
    with pytest.raises(DatasetLayoutError, match="X.json: label 'Mystery'"):
        datasets.list_entries("deepfakebench", rgb, options(bad, "X"))


SETTINGS = work.Settings(frames_per_video=4, image_size=32, detector=faces.NO_DETECTION)


def test_prepare_writes_records_and_lists_skipped_frames(dfb_tree, tmp_path):
    rgb, json_dir = dfb_tree
    entries = datasets.list_entries("deepfakebench", rgb, options(json_dir, "FaceForensics++"))
    out = prepare.prepare(entries, "deepfakebench", tmp_path / "out", SETTINGS)
    records = load(out)
    got = sorted((s, r["video_id"].decode(), r["method"].decode(), int(r["label"]),
                  int(r["frame_index"])) for s, rs in records.items() for r in rs)
    assert got == sorted(
        [("train", "FF-real/c23/000", "FF-real", 0, n) for n in (0, 5, 10, 15)]  # First 4.
        + [("validation", "FF-real/c23/001", "FF-real", 0, n) for n in (1, 2)]
        + [("train", "FF-DF/c23/000_003", "FF-DF", 1, 0)]
        + [("train", "FF-NT/c23/000_003", "FF-NT", 1, n) for n in (0, 1)]
    )
    frame = next(r for r in records["train"] if r["video_id"] == b"FF-NT/c23/000_003")
    source = frame_image("FaceForensics++/manipulated_sequences/NeuralTextures/c23/frames"
                         "/000_003/0")
    expected = cv2.resize(source, (32, 32), interpolation=cv2.INTER_CUBIC)  # As their loader.
    np.testing.assert_array_equal(frame["image"], expected)
    np.testing.assert_array_equal(frame["face_box"], [0, 0, SIZE, SIZE])
    manifest = json.loads((out / "manifest.json").read_text())
    [gone] = manifest["skipped"]
    assert gone["video_id"] == "FF-DF/c23/001_870" and gone["split"] == "test"
    assert gone["reason"].startswith("listed but missing on disk: ")
    frames = {(f["video_id"], Path(f["frame"]).name): f["reason"]
              for f in manifest["skipped_frames"]}
    assert set(frames) == {("FF-real/c23/001", "009.png"), ("FF-DF/c23/000_003", "003.png")}
    assert frames[("FF-real/c23/001", "009.png")].startswith("listed but missing on disk: ")
    assert frames[("FF-DF/c23/000_003", "003.png")].startswith("unreadable: ")
    assert manifest["splits"]["train"]["methods"] == {
        "FF-DF": {"frames": 1, "videos": 1},
        "FF-NT": {"frames": 2, "videos": 1},
        "FF-real": {"frames": 4, "videos": 1},
    }


def test_beam_runner_writes_the_same_records(dfb_tree, tmp_path):
    pytest.importorskip("apache_beam")
    rgb, json_dir = dfb_tree
    entries = datasets.list_entries("deepfakebench", rgb, options(json_dir, "FaceForensics++"))
    local = prepare.prepare(entries, "deepfakebench", tmp_path / "local", SETTINGS)
    beam = prepare.prepare(entries, "deepfakebench", tmp_path / "beam", SETTINGS, runner="beam",
                           beam_options=["--runner=DirectRunner"])

    def records(out):
        return sorted((r["video_id"], r["frame_index"], r["image"].tobytes(), r["label"])
                      for rs in load(out).values() for r in rs)

    assert records(beam) == records(local)
    manifests = [json.loads((o / "manifest.json").read_text()) for o in (local, beam)]
    for key in ("splits", "skipped", "skipped_frames"):
        assert manifests[0][key] == manifests[1][key]


def test_cli_with_detection(dfb_tree, tmp_path, capsys):
    rgb, json_dir = dfb_tree
    out = tmp_path / "cli"
    argv = ["prepare", "deepfakebench", "--root", str(rgb), "--json", str(json_dir),
            "--name", "Celeb-DF-v2", "--out", str(out), "--workers", "1"]
    assert cli.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["deepfakebench"] == {"name": "Celeb-DF-v2", "compression": "c23"}
    assert manifest["settings"]["image_size"] == 256 and manifest["settings"]["detector"] == "none"
    assert manifest["splits"]["test"]["videos"] == 2
    assert "test: 2 videos, 4 frames" in capsys.readouterr().out
    # --detect: these frames show no face, so the detector keeps none of them.
    argv = [*argv[:-4], "--out", str(tmp_path / "detect"), "--workers", "1", "--detect",
            "--detector", "haar"]
    assert cli.main(argv) == 2
    manifest = json.loads((tmp_path / "detect" / "manifest.json").read_text())
    assert {s["reason"] for s in manifest["skipped"]} == {"no face found in 2 sampled frames",
                                                          "no face found in 1 sampled frames"}


def test_detect_recentres_frames_on_the_face(tmp_path):
    """--detect: frames with a face off-centre are cropped around it (box in frame pixels)."""
    from skimage import data

    face = cv2.resize(data.astronaut()[30:200, 140:310], (96, 96), interpolation=cv2.INTER_AREA)
    rgb, positions = tmp_path / "rgb", {0: (20, 30), 7: (110, 60)}
    listed = []
    for n, (x, y) in positions.items():
        frame = np.full((180, 240, 3), (70, 110, 90), np.uint8)
        frame[y : y + 96, x : x + 96] = face
        path = rgb / "UADFV/real/frames/0000" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        listed.append(f"UADFV/real/frames/0000/{n}.png")
    table = {"UADFV": {"UADFV_Real": {"test": {"0000": {"label": "UADFV_Real", "frames": listed}}}}}
    (tmp_path / "UADFV.json").write_text(json.dumps(table))
    entries = datasets.list_entries("deepfakebench", rgb, options(tmp_path, "UADFV"))
    settings = work.Settings(frames_per_video=32, image_size=48, detector="haar")
    out = prepare.prepare(entries, "deepfakebench", tmp_path / "out", settings)
    rows = sorted(load(out)["test"], key=lambda r: r["frame_index"])
    assert [int(r["frame_index"]) for r in rows] == [0, 7]
    for row, (x, y) in zip(rows, positions.values(), strict=True):
        centre = (row["face_box"][:2] + row["face_box"][2:]) / 2
        np.testing.assert_allclose(centre, (x + 48, y + 48), atol=0.15 * 96)
        assert row["image"].shape == (48, 48, 3)
