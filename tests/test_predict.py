"""`cae-jax predict`: scores match the exported SavedModel on crops the tests cut themselves;
any failure of one input becomes its entry; flags are checked first; nothing scored is lost."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from cae_jax import export, heatmap, predict, scoring
from cae_jax import main as cli
from data_prep import deepfakebench, faces, video, work
from data_prep.entries import Entry
from tests.test_export import calibrated_model, initial_state, tiny_config

SIZE = 64
HAAR = ["--detector", "haar", "--frames-per-video", "4"]


def write_video(path, frames) -> None:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    config = tiny_config()
    _, params, batch_stats = calibrated_model(config, initial_state(config))
    return export.export_bundle(config, params, batch_stats,
                                tmp_path_factory.mktemp("predict") / "bundle",
                                formats=("saved_model",))


@pytest.fixture(scope="module")
def saved_model(bundle):
    """The bundle's TF SavedModel: scores by another runtime than predict's JAX predictor."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(bundle / export.SAVED_MODEL_DIR)).signatures[
        "reconstruct"]
    return lambda crops: {k: v.numpy() for k, v in signature(images=tf.constant(crops)).items()}


def haar_crop(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest Haar face of an RGB frame, cut at margin 1.3: (crop, box)."""
    box = max((d.box for d in faces.make_detector("haar").detect(frame)),
              key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    return faces.crop_face(frame, box, SIZE, 1.3), box


def decode_all(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A face photo, a video of it moving, a faceless video, and three broken files."""
    root = tmp_path_factory.mktemp("media")
    face = cv2.resize(skdata.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "astronaut.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    write_video(root / "moving.mp4", [np.roll(face, 3 * i, axis=1) for i in range(12)])
    noise = np.random.default_rng(0).integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
    write_video(root / "noise.mp4", list(noise))
    (root / "notes.txt").write_text("not media")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "empty.mp4").write_bytes(b"")
    return root


def run_predict(tmp_path, *argv) -> tuple[int, dict]:
    out = tmp_path / "preds.json"
    code = cli.main(["predict", *argv, "--out", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else {}


def by_name(report: dict) -> dict:
    return {r["path"].rsplit("/", 1)[-1]: r for r in report["results"]}


def test_image_and_video_scores_match_the_saved_model(bundle, saved_model, media, tmp_path):
    heatmaps = tmp_path / "heatmaps"
    code, report = run_predict(
        tmp_path, "--model", str(bundle), str(media / "astronaut.png"), str(media / "moving.mp4"),
        *HAAR, "--threshold", "0.5", "--heatmaps", str(heatmaps),
    )
    assert code == 0 and report["complete"] is True
    results = by_name(report)

    image = results["astronaut.png"]
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    crop, box = haar_crop(photo)
    expected = float(saved_model(crop[None])["probability"][0])
    assert (image["status"], image["kind"], len(image["frames"])) == ("ok", "image", 1)
    assert image["score"] == pytest.approx(expected, abs=1e-4)
    assert image["label"] == ("fake" if expected >= 0.5 else "real")
    np.testing.assert_allclose(image["frames"][0]["box"], box, atol=1e-3)

    clip = results["moving.mp4"]
    frames = decode_all(media / "moving.mp4")
    assert len(frames) == 12 and clip["num_sampled"] == 4
    sampled = [1, 4, 7, 10]  # The middle frame of each quarter of the 12.
    assert [f["frame_index"] for f in clip["frames"]] == sampled
    crops, boxes = zip(*(haar_crop(frames[i]) for i in sampled), strict=True)
    out = saved_model(np.stack(crops))
    np.testing.assert_allclose([f["score"] for f in clip["frames"]], out["probability"],
                               atol=1e-4)
    assert clip["score"] == pytest.approx(np.mean(out["probability"]), abs=1e-4)
    np.testing.assert_allclose([f["box"] for f in clip["frames"]], boxes, atol=1e-3)
    np.testing.assert_allclose([f["recon_error"] for f in clip["frames"]],
                               out["error_map"].mean(axis=(1, 2)), atol=1e-4)

    scale = heatmap.error_scale(out["error_map"])
    for frame, crop_k, error in zip(clip["frames"], crops, out["error_map"], strict=True):
        png = cv2.cvtColor(cv2.imread(frame["heatmap"]), cv2.COLOR_BGR2RGB)
        assert frame["heatmap"].startswith(str(heatmaps / "moving.mp4"))
        np.testing.assert_allclose(png, heatmap.overlay(crop_k, error, scale), atol=2)
    assert len(list((heatmaps / "astronaut.png").glob("*.png"))) == 1


def test_threshold_sets_label(bundle, media, tmp_path):
    image = str(media / "astronaut.png")
    _, low = run_predict(tmp_path, "--model", str(bundle), image, *HAAR, "--threshold", "0")
    _, high = run_predict(tmp_path, "--model", str(bundle), image, *HAAR, "--threshold", "1.01")
    assert low["results"][0]["label"] == "fake" and high["results"][0]["label"] == "real"
    assert low["threshold"] == 0 and high["threshold"] == 1.01


def test_bad_inputs_become_entries_and_the_good_one_is_scored(bundle, media, tmp_path, capsys):
    names = ["notes.txt", "broken.jpg", "empty.mp4", "noise.mp4", "astronaut.png"]
    code, report = run_predict(tmp_path, "--model", str(bundle),
                               *[str(media / n) for n in names], *HAAR)
    assert code == 0
    results = by_name(report)
    assert list(results) == names  # Every input has its entry, in order.
    assert results["notes.txt"]["status"] == "error"
    assert "not an image or video" in results["notes.txt"]["error"]
    assert results["broken.jpg"]["status"] == "error"
    assert "broken.jpg: cannot decode as an image" in results["broken.jpg"]["error"]
    assert results["empty.mp4"]["status"] == "error"
    assert "empty.mp4: zero-length file" in results["empty.mp4"]["error"]
    noise = results["noise.mp4"]
    assert (noise["status"], noise["score"], noise["frames"]) == ("no_face", None, [])
    assert noise["num_sampled"] == 4
    assert results["astronaut.png"]["status"] == "ok"
    err = capsys.readouterr().err
    assert "noise.mp4: no face found" in err and "scored 1 of 5 inputs" in err


def test_nothing_scored_exits_non_zero(bundle, media, tmp_path):
    code, report = run_predict(tmp_path, "--model", str(bundle), str(media / "noise.mp4"),
                               str(media / "notes.txt"), *HAAR)
    assert code == 1
    assert [r["status"] for r in report["results"]] == ["no_face", "error"]


def test_missing_bundle_is_a_clear_error(media, tmp_path, capsys):
    code, report = run_predict(tmp_path, "--model", str(tmp_path / "nope"),
                               str(media / "astronaut.png"))
    assert code == 2 and report == {}
    assert "model.json: not found" in capsys.readouterr().err
    code = cli.main(["predict", "--model", str(tmp_path), str(media / "astronaut.png"),
                     "--out", str(tmp_path / "missing" / "preds.json")])
    assert code == 2 and "missing/preds.json: its folder does not exist" in capsys.readouterr().err


def test_folder_expands_to_its_media_files(media):
    names = [p.name for p in predict.expand_inputs([str(media)])]
    assert names == ["astronaut.png", "broken.jpg", "empty.mp4", "moving.mp4", "noise.mp4"]


def test_ffpp_clip_with_default_detector(bundle, ffpp_mini, tmp_path):
    clip = sorted((ffpp_mini / "original_sequences").rglob("*.mp4"))[0]
    code, report = run_predict(tmp_path, "--model", str(bundle), str(clip),
                               "--frames-per-video", "3")
    entry = report["results"][0]
    assert code == 0 and entry["status"] == "ok" and entry["num_sampled"] == 3
    assert len(entry["frames"]) == 3
    capture = cv2.VideoCapture(str(clip))
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    capture.release()
    for frame in entry["frames"]:
        x0, y0, x1, y1 = frame["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert 0.0 <= frame["score"] <= 1.0
    assert entry["score"] == pytest.approx(np.mean([f["score"] for f in entry["frames"]]))


def test_no_detect_scores_whole_frames(bundle, saved_model, media, tmp_path):
    code, report = run_predict(tmp_path, "--model", str(bundle), "--no-detect", *HAAR,
                               str(media / "astronaut.png"), str(media / "noise.mp4"))
    assert code == 0
    results = by_name(report)
    photo = cv2.cvtColor(cv2.imread(str(media / "astronaut.png")), cv2.COLOR_BGR2RGB)
    crop = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    expected = saved_model(crop[None])["probability"][0]
    assert results["astronaut.png"]["score"] == pytest.approx(float(expected), abs=1e-4)
    assert results["astronaut.png"]["frames"][0]["box"] == [0.0, 0.0, 256.0, 256.0]
    noise = results["noise.mp4"]  # No face, but scored as given.
    assert noise["status"] == "ok" and len(noise["frames"]) == noise["num_sampled"] == 4


def _frame_files(media, folder) -> tuple[str, ...]:
    """The moving video's first frames as PNG files (DeepfakeBench's layout), numbered as
    their frames."""
    folder.mkdir()
    paths = []
    for index, frame in list(enumerate(decode_all(media / "moving.mp4")))[::3]:
        paths.append(str(folder / f"{index:03d}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return tuple(paths)


@pytest.mark.parametrize("kind, detector", [
    ("video", "haar"), ("image", "haar"), ("frames", "haar"), ("frames", faces.NO_DETECTION)])
def test_prepare_crops_what_predict_scores(media, tmp_path, kind, detector):
    """One cropping path: the crops, boxes and frame numbers `prepare` caches for a video, an
    image or a frame list are those `score_media` hands the model, exactly."""
    settings = work.Settings(frames_per_video=4, image_size=SIZE, detector=detector)
    options = faces.FaceOptions(detector, frames_per_video=4)
    if kind == "frames":
        entry = Entry(tmp_path / "frames", "clip", "real", "real", "test",
                      frames=_frame_files(media, tmp_path / "frames"))
        read, _ = deepfakebench.read_frames(entry, 4)
        options = faces.FaceOptions(detector, frames_per_video=4,
                                    whole_frame_interpolation=deepfakebench.FRAME_INTERPOLATION)
    else:
        path = media / ("moving.mp4" if kind == "video" else "astronaut.png")
        entry = Entry(path, path.name, "real", "real", "test")
        read = scoring.read_file(path, 4)
    cache = work.open_cache(tmp_path / "cache", settings)
    summary = work.process(entry, settings, cache)
    cached = list(work.cached_examples(entry, "mine", cache))
    given = []

    def model(crops):
        given.append(crops)
        return {"probability": np.zeros(len(crops)), "error_map": np.zeros((len(crops), 1))}

    scored = scoring.score_media(read, model, SIZE, options, 0.5)
    assert summary["status"] == "ok" and len(cached) == summary["frames"] >= 1
    (crops,) = given
    stored = [video.decode_image(np.frombuffer(c["image"], np.uint8)) for c in cached]
    np.testing.assert_array_equal(np.stack(stored), crops)
    np.testing.assert_array_equal([c["face_box"] for c in cached],
                                  [f["box"] for f in scored.entry["frames"]])
    assert [c["frame_index"] for c in cached] == [f["frame_index"] for f in scored.entry["frames"]]


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ("--frames-per-video", "0", "--frames-per-video must be at least 1, got 0"),
    ("--margin", "-1", "--margin must be positive, got -1.0"),
    ("--threshold", "nan", "--threshold must be a number, got nan"),
])
def test_invalid_flags_are_refused_before_any_work(media, tmp_path, capsys, flag, value, message):
    code, report = run_predict(tmp_path, "--model", str(tmp_path / "not-loaded-yet"),
                               str(media / "astronaut.png"), flag, value)
    assert code == 2 and report == {}
    assert f"error: {message}" in capsys.readouterr().err


def test_any_failure_of_one_input_is_its_entry(bundle, media, tmp_path, monkeypatch, capsys):
    moving = media / "moving.mp4"
    real_read = scoring.read_file

    def denied(path, *args):
        if path == moving:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, *args)

    def full_disk(path, image):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scoring, "read_file", denied)
    monkeypatch.setattr(heatmap, "write_png", full_disk)
    heatmaps = tmp_path / "heatmaps"
    code, report = run_predict(tmp_path, "--model", str(bundle), str(moving),
                               str(media / "astronaut.png"), *HAAR, "--heatmaps", str(heatmaps))
    assert code == 0 and report["complete"] is True
    results = by_name(report)
    assert results["moving.mp4"] == {
        "path": str(moving), "status": "error",
        "error": f"{moving}: PermissionError: [Errno 13] Permission denied: '{moving}'"}
    image = results["astronaut.png"]  # Scored; only its heatmap is missing.
    assert image["status"] == "ok" and 0 <= image["score"] <= 1
    assert image["heatmap_error"] == (
        f"{heatmaps / 'astronaut.png'}: OSError: [Errno 28] No space left on device")
    assert "heatmap" not in image["frames"][0]
    err = capsys.readouterr().err
    assert "Permission denied" in err and "heatmaps not written" in err


def test_an_interrupted_run_keeps_every_score_so_far(bundle, media, tmp_path, monkeypatch,
                                                     capsys):
    """Ctrl-C: the scores so far stay in --out, one line says so, no traceback."""
    out = tmp_path / "preds.json"
    real_score = predict.score_input
    seen = []

    def interrupted(path, *args):
        if path.name == "moving.mp4":
            seen.append(json.loads(out.read_text()))  # Written after each input, not at the end.
            raise KeyboardInterrupt
        return real_score(path, *args)

    monkeypatch.setattr(predict, "score_input", interrupted)
    assert cli.main(["predict", "--model", str(bundle), str(media / "astronaut.png"),
                     str(media / "moving.mp4"), *HAAR, "--out", str(out)]) == 130
    report = json.loads(out.read_text())
    assert report["complete"] is False and report == seen[0]
    (image,) = report["results"]
    assert image["path"] == str(media / "astronaut.png") and image["status"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.json"]
    err = capsys.readouterr().err
    assert f"interrupted: 1 of 2 inputs scored, kept in {out}" in err
    assert "Traceback" not in err


def test_without_out_results_stream_as_json_lines_and_survive_sigterm(
        bundle, media, monkeypatch, capsys):
    """Each input's line is on stdout as soon as it is scored; SIGTERM ends the run there."""
    import os
    import signal

    real_score = predict.score_input
    printed = []

    def terminated(path, *args):
        if path.name == "moving.mp4":
            printed.append(capsys.readouterr().out)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_score(path, *args)

    monkeypatch.setattr(predict, "score_input", terminated)
    inputs = [str(media / "astronaut.png"), str(media / "moving.mp4"), str(media / "noise.mp4")]
    assert cli.main(["predict", "--model", str(bundle), *inputs, *HAAR]) == 130
    header, image = (json.loads(line) for line in printed[0].splitlines())
    assert header["threshold"] == 0.5 and header["decision"].startswith("0.5 (uncalibrated")
    assert image["path"] == inputs[0] and image["status"] == "ok"
    captured = capsys.readouterr()
    assert captured.out == ""  # Nothing after the signal: no half report.
    assert "interrupted: 1 of 3 inputs scored" in captured.err
    assert "Traceback" not in captured.err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Restored.


def test_heatmap_folders_of_equal_names_never_meet(tmp_path):
    paths = [tmp_path / "a" / "astro.png", tmp_path / "b" / "0000_astro.png",
             tmp_path / "c" / "astro.png"]
    folders = predict.heatmap_folders(paths, tmp_path / "maps")
    assert [f.name for f in folders] == ["astro.png.0", "0000_astro.png", "astro.png.2"]
