"""`cae-jax predict`: scores match the model on prepare's crops; bad inputs become entries."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from cae_jax import export, heatmap
from cae_jax import main as cli
from data_prep import faces, video
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
                                tmp_path_factory.mktemp("predict") / "bundle", formats=())


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


def test_image_and_video_scores_match_model_on_prepare_crops(bundle, media, tmp_path):
    heatmaps = tmp_path / "heatmaps"
    code, report = run_predict(
        tmp_path, "--model", str(bundle), str(media / "astronaut.png"), str(media / "moving.mp4"),
        *HAAR, "--threshold", "0.5", "--heatmaps", str(heatmaps),
    )
    assert code == 0
    results = by_name(report)
    predictor = export.load_bundle(bundle)

    image = results["astronaut.png"]
    crop = faces.detect_and_crop([video.read_image(media / "astronaut.png")], "haar", SIZE, 1.3,
                                 track=False)
    expected = float(predictor.predict_proba(crop.crops)[0])
    assert (image["status"], image["kind"], len(image["frames"])) == ("ok", "image", 1)
    assert image["score"] == pytest.approx(expected, abs=1e-6)
    assert image["label"] == ("fake" if expected >= 0.5 else "real")
    np.testing.assert_allclose(image["frames"][0]["box"], crop.boxes[0], atol=1e-3)

    clip = results["moving.mp4"]
    found = faces.extract_faces(media / "moving.mp4", 4, SIZE, 1.3, "haar")
    out = predictor.reconstruct(found.crops)
    assert len(found.crops) == 4 and clip["num_sampled"] == 4
    assert [f["frame_index"] for f in clip["frames"]] == found.frame_indices.tolist()
    frame_scores = [f["score"] for f in clip["frames"]]
    np.testing.assert_allclose(frame_scores, out["probability"], atol=1e-6)
    assert clip["score"] == pytest.approx(np.mean(out["probability"]), abs=1e-6)
    np.testing.assert_allclose([f["box"] for f in clip["frames"]], found.boxes, atol=1e-3)
    np.testing.assert_allclose([f["recon_error"] for f in clip["frames"]],
                               out["error_map"].mean(axis=(1, 2)), atol=1e-6)

    scale = heatmap.error_scale(out["error_map"])
    for frame, crop_k, error in zip(clip["frames"], found.crops, out["error_map"], strict=True):
        png = cv2.cvtColor(cv2.imread(frame["heatmap"]), cv2.COLOR_BGR2RGB)
        assert frame["heatmap"].startswith(str(heatmaps / "moving.mp4"))
        np.testing.assert_allclose(png, heatmap.overlay(crop_k, error, scale), atol=1)
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
    from cae_jax import predict

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


def test_no_detect_scores_whole_frames(bundle, media, tmp_path):
    code, report = run_predict(tmp_path, "--model", str(bundle), "--no-detect", *HAAR,
                               str(media / "astronaut.png"), str(media / "noise.mp4"))
    assert code == 0
    results = by_name(report)
    photo = video.read_image(media / "astronaut.png")
    crop = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    expected = export.load_bundle(bundle).predict_proba(crop[None])[0]
    assert results["astronaut.png"]["score"] == pytest.approx(float(expected), abs=1e-6)
    assert results["astronaut.png"]["frames"][0]["box"] == [0.0, 0.0, 256.0, 256.0]
    noise = results["noise.mp4"]  # No face, but scored as given.
    assert noise["status"] == "ok" and len(noise["frames"]) == noise["num_sampled"] == 4
