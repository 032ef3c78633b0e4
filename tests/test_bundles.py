"""Any model to a bundle, decided at its operating point: an imported DeepfakeBench detector
exports and predicts at its own size; encoder-only imports are refused; export scores the
validation data into model.json's thresholds, and `predict` decides at them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from cae_jax import flat_state, metrics, models, scoring, serving
from cae_jax import main as cli
from cae_jax.backbones import xception
from data_prep import faces
from tests import datasets, test_predict
from tests.test_export import initial_state, tiny_config, write_two_checkpoints

media = test_predict.media  # Its face photo and video, as a fixture here too.
TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def detector_arrays(model_config, seed: int, crops: np.ndarray | None = None):
    """A random tiny detector: (graphdef, params, batch_stats) as ours, and the same arrays as
    a DeepfakeBench state dict (timm's OIHW layout under `backbone.`, a 2-way last_linear).
    With `crops`, the head is scaled so their logits have mean 0 and deviation 1."""
    graphdef, params, stats = nnx.split(models.build_model(model_config, seed),
                                        nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)
    flat_p = {k: np.asarray(v) for k, v in flat_state.flatten(params).items()}
    flat_s = {k: np.asarray(v) for k, v in flat_state.flatten(stats).items()}
    state_dict = {}
    for layer in xception.encoder_layout(model_config):
        p, t = f"encoder.{layer.path}", f"backbone.{layer.timm}"
        if layer.kind == "conv":
            state_dict[f"{t}.weight"] = flat_p[f"{p}.kernel"].transpose(3, 2, 0, 1)
        elif layer.kind == "sep":
            state_dict[f"{t}.conv1.weight"] = flat_p[f"{p}.depthwise"].transpose(3, 2, 0, 1)
            state_dict[f"{t}.pointwise.weight"] = (
                flat_p[f"{p}.pointwise.kernel"].transpose(3, 2, 0, 1))
        else:  # Spread batch statistics, so the forward is not the initial one.
            width = flat_p[f"{p}.scale"].shape
            flat_p[f"{p}.scale"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
            flat_p[f"{p}.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
            flat_s[f"{p}.mean"] = rng.normal(0, 0.1, width).astype(np.float32)
            flat_s[f"{p}.var"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
            state_dict.update({f"{t}.weight": flat_p[f"{p}.scale"],
                               f"{t}.bias": flat_p[f"{p}.bias"],
                               f"{t}.running_mean": flat_s[f"{p}.mean"],
                               f"{t}.running_var": flat_s[f"{p}.var"]})
    width = flat_p["classifier.out.kernel"].shape[0]
    head = rng.normal(0, 3 / np.sqrt(width), (2, width)).astype(np.float32)
    bias = np.array([0.2, -0.1], np.float32)
    flat_p["classifier.out.kernel"] = (head[1] - head[0])[:, None]
    flat_p["classifier.out.bias"] = np.array([bias[1] - bias[0]], np.float32)
    if crops is not None:
        model = nnx.merge(graphdef, flat_state.unflatten(params, flat_p),
                          flat_state.unflatten(stats, flat_s))
        logits = np.asarray(model(crops, train=False)["logit"])
        head, bias = head / logits.std(), (bias - [0, logits.mean()]) / logits.std()
        flat_p["classifier.out.kernel"] = (head[1] - head[0])[:, None].astype(np.float32)
        flat_p["classifier.out.bias"] = np.array([bias[1] - bias[0]], np.float32)
    state_dict["backbone.last_linear.weight"], state_dict["backbone.last_linear.bias"] = head, bias
    state_dict = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}
    return (graphdef, flat_state.unflatten(params, flat_p), flat_state.unflatten(stats, flat_s),
            state_dict)


def test_imported_detector_exports_and_predicts_at_its_own_size(tmp_path, media, capsys):
    model_config = tiny_config().model
    model_config.update(image_size=256, pool_padding="torch", bn_epsilon=1e-5)
    model_config.classifier.hidden = ()
    inputs = [str(media / "astronaut.png"), str(media / "moving.mp4")]
    crops = np.concatenate([faces.whole_frames(scoring.read_file(Path(p), 3).frames, 256).crops
                            for p in inputs])
    graphdef, params, stats, state_dict = detector_arrays(model_config, 1, crops)
    source = tmp_path / "xception_best.safetensors"
    save_file(state_dict, str(source))
    imported, bundle = tmp_path / "imported", tmp_path / "bundle"
    assert cli.main(["import-weights", "--format", "deepfakebench", "--input", str(source),
                     "--output", str(imported), "--config", TINY]) == 0
    assert cli.main(["export", "--checkpoint", str(imported), "--out", str(bundle),
                     "--formats="]) == 0
    assert "the bundle decides at 0.5" in capsys.readouterr().err
    meta = json.loads((bundle / serving.MODEL_JSON).read_text())
    assert meta["image_size"] == 256 and meta["step"] == 0
    assert (meta["model"]["pool_padding"], meta["model"]["bn_epsilon"]) == ("torch", 1e-5)
    assert meta["operating_point"] == {"reason": "no validation data given at export"}
    assert meta["decoder_trained"] is False

    out = tmp_path / "preds.json"
    assert cli.main(["predict", "--model", str(bundle), *inputs, "--no-detect",
                     "--frames-per-video", "3", "--out", str(out),
                     "--heatmaps", str(tmp_path / "maps")]) == 0
    assert "decoder was never trained" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["threshold"] == 0.5 and "uncalibrated" in report["decision"]
    classify = jax.jit(serving.serving_fns(graphdef)["classify"])
    expected = np.asarray(classify((params, stats), crops)["probability"])
    assert 0.02 < expected.min() and expected.max() < 0.98  # The head decides something.
    assert [(r["status"], r["kind"], len(r["frames"])) for r in report["results"]] == [
        ("ok", "image", 1), ("ok", "video", 3)]
    scores = [f["score"] for r in report["results"] for f in r["frames"]]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_encoder_only_import_is_refused_with_a_way_forward(tmp_path, capsys):
    model_config = tiny_config().model
    *_, state_dict = detector_arrays(model_config, seed=2)
    timm = {k.removeprefix("backbone."): v for k, v in state_dict.items()
            if "last_linear" not in k}
    source = tmp_path / "xception.safetensors"
    save_file(timm, str(source))
    imported = tmp_path / "imported"
    assert cli.main(["import-weights", "--format", "timm", "--input", str(source),
                     "--output", str(imported), "--config", TINY]) == 0
    with pytest.raises(SystemExit) as err:
        cli.main(["export", "--checkpoint", str(imported), "--out", str(tmp_path / "b")])
    assert str(err.value) == (
        f"error: {imported}: timm encoder weights only (no deepfake classifier): train a "
        f"detector from them first (cae-jax train --config.init_from={imported} ...), then "
        "export its workdir")
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny run's workdir exported with a 6 + 6 face validation split as calibration data."""
    root = tmp_path_factory.mktemp("calibrated")
    write_two_checkpoints(root / "run", initial_state(tiny_config()))
    data = datasets.write(root / "data", {"validation": (6, 6)})
    bundle = root / "bundle"
    assert cli.main(["export", "--workdir", str(root / "run"), "--out", str(bundle),
                     "--formats=", "--calibration-data", str(data)]) == 0
    return bundle, data


def test_export_stores_the_validation_operating_points(calibrated):
    bundle, data = calibrated
    meta = json.loads((bundle / serving.MODEL_JSON).read_text())
    point = meta["operating_point"]
    assert meta["decoder_trained"] is True
    faces = np.stack([datasets.face_crop(i) for i in range(12)])
    labels = np.array([0] * 6 + [1] * 6)
    probs = serving.load_bundle(bundle).predict_proba(faces)
    expected = metrics.operating_points(labels, probs)
    assert sorted(point["thresholds"]) == ["eer", "fpr1", "fpr10", "fpr5"]
    for name, threshold in expected.items():
        assert point["thresholds"][name] == pytest.approx(threshold, abs=1e-6)
        assert point["rates"][name] == pytest.approx(metrics.rates_at(labels, probs, threshold))
    assert point["auc"] == pytest.approx(metrics.auc(labels, probs), abs=1e-6)
    videos = {e["video_id"] for e in datasets.examples("toy", "validation", 6, 6, 64)}
    assert (point["faces"], point["videos"], point["split"], point["data"]) == (
        12, len(videos), "validation", str(data))
    assert point["default"] == "eer"


def test_predict_decides_at_the_bundles_operating_point(calibrated, media, tmp_path):
    bundle, _ = calibrated
    thresholds = json.loads((bundle / serving.MODEL_JSON).read_text())[
        "operating_point"]["thresholds"]
    image = str(media / "astronaut.png")
    out = tmp_path / "p.json"
    for flags, name in (([], "eer"), (["--operating-point", "fpr5"], "fpr5")):
        assert cli.main(["predict", "--model", str(bundle), image, "--no-detect", *flags,
                         "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["threshold"] == thresholds[name]
        assert report["decision"].startswith(f"{name} operating point on ")
        (result,) = report["results"]
        assert result["label"] == ("fake" if result["score"] >= thresholds[name] else "real")


def test_a_bundle_of_the_previous_release_decides_at_one_half(calibrated, media,
                                                              tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(calibrated[0], old)
    meta = json.loads((old / serving.MODEL_JSON).read_text())
    del meta["operating_point"]  # What bundles held before operating points.
    (old / serving.MODEL_JSON).write_text(json.dumps(meta))
    out = tmp_path / "p.json"
    assert cli.main(["predict", "--model", str(old), str(media / "astronaut.png"),
                     "--no-detect", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threshold"] == 0.5
    assert report["decision"] == "0.5 (uncalibrated: bundle written without an operating point)"
    assert "deciding at 0.5000: 0.5 (uncalibrated" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(old), str(media / "astronaut.png"),
                     "--no-detect", "--operating-point", "fpr1", "--out", str(out)]) == 2
    assert "--operating-point fpr1: the bundle has no operating points" in (
        capsys.readouterr().err)


def test_serving_and_scoring_import_neither_tensorflow_nor_the_train_step():
    program = ("import sys; from cae_jax import scoring, serving; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow' "
               "or m == 'cae_jax.train_step'))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_demo_decides_at_the_bundles_threshold_and_reports_balanced_accuracy(tmp_path):
    from cae_jax import checkpoints, demo, eval_pipeline
    from cae_jax.config import load_config

    data = demo.build_dataset(tmp_path / "data", size=64, seed=0)
    write_two_checkpoints(tmp_path / "train", initial_state(tiny_config()))
    config = tiny_config()
    config.input.train_dirs = (str(data),)  # As the demo trains: validates on its own data.
    checkpoints.write_config(tmp_path / "train", config)
    decided = demo.export_and_predict(tmp_path, data, 10)
    meta = json.loads((tmp_path / "bundle" / serving.MODEL_JSON).read_text())
    point = meta["operating_point"]
    assert (point["data"], point["split"]) == (str(data), "validation")
    assert decided["threshold"] == point["thresholds"]["eer"]
    predictions = decided["predictions"]
    assert predictions["threshold"] == decided["threshold"]
    for result in predictions["results"]:
        assert result["label"] == ("fake" if result["score"] >= decided["threshold"] else "real")
    predictor = serving.load_bundle(tmp_path / "bundle")
    rows = list(eval_pipeline.eval_batches(load_config(demo.DEMO_CONFIG), str(data), "test"))
    labels = np.concatenate([b["label"][b["mask"]] for b in rows])
    probs = predictor.predict_proba(np.concatenate([b["image"][b["mask"]] for b in rows]))
    fake = probs >= decided["threshold"]
    balanced = (fake[labels == 1].mean() + (~fake[labels == 0]).mean()) / 2
    assert decided["test_balanced_acc"] == pytest.approx(balanced, abs=1e-12)


def test_a_run_whose_data_moved_still_exports_and_says_why_it_decides_at_one_half(tmp_path,
                                                                                   capsys):
    from cae_jax import checkpoints

    write_two_checkpoints(tmp_path / "run", initial_state(tiny_config()))
    config = tiny_config()
    config.input.train_dirs = (str(tmp_path / "moved"),)
    checkpoints.write_config(tmp_path / "run", config)
    bundle = tmp_path / "bundle"
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(bundle),
                     "--formats="]) == 0
    reason = json.loads((bundle / serving.MODEL_JSON).read_text())["operating_point"]["reason"]
    assert reason.startswith("the run's validation data is not readable here (")
    assert str(tmp_path / "moved") in reason and reason in capsys.readouterr().err
    assert serving.decision_threshold(serving.read_meta(bundle)) == (0.5, f"0.5 (uncalibrated: "
                                                                         f"{reason})")
    with pytest.raises(SystemExit, match=f"error: .*{tmp_path / 'moved'}"):
        cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "b2"),
                  "--formats=", "--calibration-data", str(tmp_path / "moved")])
