"""`evaluate --scores-out / --from-scores`, validation-chosen operating points, calibration,
robustness rows and `compare`, end to end on a tiny checkpoint and from fixed scores."""

import json

import numpy as np
import pytest

from cae_jax import evaluate, metrics, scores_file
from cae_jax import main as cli


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluate run: test + validation, two perturbations, scores in CSV and Parquet."""
    from tests import datasets
    from tests.test_export import initial_state, tiny_config, write_two_checkpoints

    tmp = tmp_path_factory.mktemp("evaluated")
    write_two_checkpoints(tmp / "run", initial_state(tiny_config()))
    data = datasets.write(tmp / "toy", {"validation": (8, 8), "test": (8, 8)}, num_shards=1)
    runs = {}
    for ext in ("csv", "parquet"):
        out = tmp / ext / "metrics.json"
        assert cli.main(["evaluate", "--checkpoint", str(tmp / "run"), "--data", str(data),
                         "--out", str(out), "--val-data", str(data), "--bootstrap", "200",
                         "--perturb", "jpeg:90,10", "--perturb", "noise:40",
                         "--protocol", "deepfakebench",
                         "--scores-out", str(tmp / ext / f"scores.{ext}")]) == 0
        runs[ext] = out
    return tmp, runs


def without_source(report):
    return {k: v for k, v in report.items() if k not in ("checkpoint", "step", "data", "scores")}


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_from_scores_reproduces_every_number(evaluated, ext):
    tmp, runs = evaluated
    first = json.loads(runs[ext].read_text())
    again = tmp / ext / "again.json"
    assert cli.main(["evaluate", "--from-scores", str(tmp / ext / f"scores.{ext}"),
                     "--out", str(again), "--bootstrap", "200",
                     "--protocol", "deepfakebench"]) == 0
    assert without_source(json.loads(again.read_text())) == without_source(first)
    for table in ("table.md", "table.json", "report.md", "deepfakebench.md"):
        texts = [(tmp / ext / f"{stem}_{table}").read_text() for stem in ("again", "metrics")]
        assert texts[0] == texts[1]
    for plot in ("roc", "reliability", "robustness"):
        assert (tmp / ext / f"again_{plot}_toy.png").stat().st_size > 1000


def test_scores_file_holds_every_face(evaluated):
    tmp, _ = evaluated
    csv, parquet = (scores_file.read(tmp / e / f"scores.{e}") for e in ("csv", "parquet"))
    for name in scores_file.COLUMNS:
        np.testing.assert_array_equal(csv[name], parquet[name])
    # 16 test faces unperturbed and under 3 perturbations, 16 validation faces.
    assert len(csv["label"]) == 16 * 4 + 16
    clean_test = (csv["split"] == "test") & (csv["perturbation"] == "")
    assert clean_test.sum() == 16 and sorted(set(csv["perturbation"])) == [
        "", "jpeg:10", "jpeg:90", "noise:40"]
    assert set(csv["data"]) == {"toy"} and set(csv["split"]) == {"test", "validation"}


def test_report_sections(evaluated):
    _, runs = evaluated
    report = json.loads(runs["csv"].read_text())
    frame = report["results"]["toy"]["all"]["frame"]
    low, high = frame["auc_ci"]
    assert low <= frame["auc"] <= high
    (protocol,) = report["deepfakebench"]
    assert (protocol["frame_auc_ci"], protocol["video_auc_ci"]) == (
        frame["auc_ci"], report["results"]["toy"]["all"]["video"]["auc_ci"])
    rows = report["robustness"]["toy"]
    assert [r["perturbation"] for r in rows] == ["none", "jpeg:90", "jpeg:10", "noise:40"]
    assert rows[0]["frame_auc"] == frame["auc"]
    points = report["operating_points"]
    assert points["validation"] == {**points["validation"], "data": "toy", "split": "validation",
                                    "frames": 16}
    assert set(points["test"]["toy"]) == {"eer", "fpr1", "fpr5", "fpr10", "test_eer"}
    assert 0 <= report["calibration"]["toy"]["ece"] <= 1


def test_validation_data_that_cannot_pick_thresholds(evaluated, capsys):
    tmp, _ = evaluated
    run, data = str(tmp / "run"), str(tmp / "toy")
    common = ["evaluate", "--checkpoint", run, "--data", data, "--out", str(tmp / "v.json")]
    for flags, message in ((["--val-data", str(tmp / "nowhere")], "dataset_info.json not found"),
                           (["--val-data", data, "--val-split", "test"],
                            "validation split test is the evaluated split")):
        with pytest.raises(SystemExit, match=f"error: --val-data/--val-split: .*{message}"):
            cli.main(common + flags)
    assert not (tmp / "v.json").exists()
    # Scoring the checkpoint's own validation split: no thresholds from it, said in one line.
    assert cli.main(common[:-2] + ["--out", str(tmp / "v.json"), "--split", "validation",
                                   "--bootstrap", "0"]) == 0
    assert "operating_points" not in json.loads((tmp / "v.json").read_text())
    assert "evaluate: no operating points: " in capsys.readouterr().out


def scores_with(split, labels, probs, data="toy"):
    n = len(labels)
    return evaluate.labelled({
        "dataset": np.full(n, "toy", object), "method": np.where(np.array(labels) == 1,
                                                                 "Deepfakes", "real"),
        "video_id": np.array([f"{split}/{i}" for i in range(n)], object),
        "frame_index": np.arange(n), "label": np.array(labels),
        "prob": np.array(probs, float), "recon_error": np.zeros(n)}, data, split)


def test_thresholds_from_validation_are_the_ones_applied_to_test():
    # Validation separates at 0.7; the test set's own best threshold is lower (0.35).
    val = scores_with("validation", [0, 0, 0, 0, 1, 1, 1, 1], [.1, .2, .6, .65, .7, .8, .9, .95])
    test = scores_with("test", [0, 0, 0, 0, 1, 1, 1, 1], [.05, .1, .2, .3, .35, .4, .5, .75])
    report = evaluate.build_report(scores_file.concatenate([test, val]), "test", "validation",
                                   resamples=0)
    points = report["operating_points"]
    chosen = metrics.operating_points(val["label"], val["prob"])
    assert points["validation"]["thresholds"] == chosen
    own = metrics.operating_points(test["label"], test["prob"])
    assert chosen["eer"] != own["eer"]
    for name, threshold in chosen.items():
        assert points["test"]["toy"][name] == {
            "threshold": threshold, **metrics.rates_at(test["label"], test["prob"], threshold)}
    assert points["test"]["toy"]["eer"]["tpr"] == 0.25  # Only 0.75 reaches 0.7.
    assert points["test"]["toy"]["test_eer"] == metrics.eer(test["label"], test["prob"])


def test_expected_calibration_error():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([0.05, 0.1, 0.9, 0.95, 0.5, 0.52])
    # Bins (15): [0, 1/15): 2 faces, mean 0.075, 0 fake; [7/15, 8/15): 0.5, 0.52, 1 fake of 2;
    # [13/15, 14/15): 0.9; [14/15, 1]: 0.95.
    expected = (2 * 0.075 + 2 * abs(0.5 - 0.51) + 0.1 + 0.05) / 6
    assert metrics.expected_calibration_error(labels, probs) == pytest.approx(expected)


@pytest.mark.parametrize("content, message", [
    ("data,split\ntoy,test\n", "missing column(s) dataset, perturbation"),
    ("", "empty file"),
])
def test_bad_scores_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "scores.csv"
    path.write_text(content)
    with pytest.raises(SystemExit) as err:
        cli.main(["evaluate", "--from-scores", str(path), "--out", str(tmp_path / "m.json")])
    assert str(err.value).startswith(f"error: {path}: ") and message in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "m.json").exists()


def test_bad_scores_value_and_extension(tmp_path):
    path = tmp_path / "scores.csv"
    test = scores_with("test", [0, 1], [0.2, 0.8])
    scores_file.write(path, test)
    path.write_text(path.read_text().replace("0.8", "high"))
    with pytest.raises(ValueError, match=f"{path}: column prob has a bad value"):
        scores_file.read(path)
    with pytest.raises(ValueError, match=r"scores.txt: scores file must end in \.parquet or \.csv"):
        scores_file.read(tmp_path / "scores.txt")
    garbage = tmp_path / "scores.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=f"{garbage}: not a readable Parquet file"):
        scores_file.read(garbage)
    with pytest.raises(SystemExit, match="error: --checkpoint needs --data"):
        cli.main(["evaluate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="error: --from-scores takes no --data"):
        cli.main(["evaluate", "--from-scores", str(path), "--data", str(tmp_path),
                  "--out", str(tmp_path / "m.json")])


def test_compare(tmp_path, capsys):
    labels = np.repeat([0, 1], 40)
    rng = np.random.default_rng(0)
    good = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.15, 80), 0, 1)
    a, b = tmp_path / "a.csv", tmp_path / "b.parquet"
    scores_file.write(a, scores_with("test", labels, good))
    scores_file.write(b, scores_with("test", labels, rng.uniform(size=80)))
    out = tmp_path / "cmp.json"
    assert cli.main(["compare", str(a), str(b), "--out", str(out), "--bootstrap", "300"]) == 0
    result = json.loads(out.read_text())["toy"]["frame"]
    assert result["excludes_zero"] and result["interval"][0] > 0
    assert result["difference"] == pytest.approx(
        metrics.auc(labels, good) - result["auc_b"])
    assert "| toy | frame |" in capsys.readouterr().out
    fewer = tmp_path / "c.csv"
    scores_file.write(fewer, scores_with("test", labels[1:], good[1:]))
    with pytest.raises(SystemExit, match="score different faces"):
        cli.main(["compare", str(a), str(fewer)])
