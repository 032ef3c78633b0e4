"""Evaluation summaries: per-method subsets with all reals, videos keyed by method too."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cae_jax import eval_tables, evaluate


def scores_table():
    # Two methods fake the same source "000.mp4"; the real video has that name too.
    rows = [
        # dataset, method, video_id, label, prob
        ("ffpp", "real", "000.mp4", 0, 0.1),
        ("ffpp", "real", "000.mp4", 0, 0.3),
        ("ffpp", "real", "001.mp4", 0, 0.6),
        ("ffpp", "Deepfakes", "000.mp4", 1, 0.9),
        ("ffpp", "Deepfakes", "000.mp4", 1, 0.7),
        ("ffpp", "FaceSwap", "000.mp4", 1, 0.2),
        ("ffpp", "FaceSwap", "000.mp4", 1, 0.4),
    ]
    d, m, v, label, prob = zip(*rows, strict=True)
    return {"dataset": np.array(d, object), "method": np.array(m, object),
            "video_id": np.array(v, object), "label": np.array(label),
            "prob": np.array(prob)}


def test_summary_per_method_and_per_video():
    result = evaluate.summarize(scores_table())
    assert set(result) == {"all", "Deepfakes", "FaceSwap"}
    s = scores_table()
    assert result["all"]["frame"]["auc"] == pytest.approx(skm.roc_auc_score(s["label"], s["prob"]))
    # Deepfakes subset = its 2 frames + all 3 real frames.
    rows = (s["method"] == "real") | (s["method"] == "Deepfakes")
    assert result["Deepfakes"]["frame"]["frames"] == 5
    assert result["Deepfakes"]["frame"]["auc"] == pytest.approx(
        skm.roc_auc_score(s["label"][rows], s["prob"][rows]))
    # Videos: real/000 (0.2), real/001 (0.6), Deepfakes/000 (0.8), FaceSwap/000 (0.3).
    assert result["all"]["video"]["videos"] == 4
    assert result["all"]["video"]["auc"] == pytest.approx(
        skm.roc_auc_score([0, 0, 1, 1], [0.2, 0.6, 0.8, 0.3]))
    assert result["FaceSwap"]["video"]["auc"] == pytest.approx(0.5)
    assert result["Deepfakes"]["video"]["acc"] == pytest.approx(2 / 3)


def test_markdown_table_lists_every_dataset_and_subset():
    table = eval_tables.markdown_table({"ffpp": evaluate.summarize(scores_table()),
                                     "celebdf": evaluate.summarize(scores_table())})
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 6
    assert lines[2].startswith("| ffpp | all | ") and lines[5].startswith("| celebdf | all | ")


def test_data_keys_are_names_unless_names_repeat():
    assert evaluate.data_keys(["/d/ffpp", "/d/celebdf/"]) == {"ffpp": "/d/ffpp",
                                                              "celebdf": "/d/celebdf/"}
    assert evaluate.data_keys(["/x/a/toy", "/y/a/toy", "/z/toy", "gs://b/other"]) == {
        "x/a/toy": "/x/a/toy", "y/a/toy": "/y/a/toy", "z/toy": "/z/toy", "other": "gs://b/other"}
    with pytest.raises(ValueError, match="names /d/ffpp twice"):
        evaluate.data_keys(["/d/ffpp", "/d/ffpp/"])


def test_dirs_with_the_same_name_keep_their_own_results(tmp_path, capsys):
    from cae_jax import main as cli
    from tests import datasets
    from tests.test_export import initial_state, tiny_config, write_two_checkpoints

    write_two_checkpoints(tmp_path / "run", initial_state(tiny_config()))
    first = datasets.write(tmp_path / "a" / "toy", {"test": (4, 4)}, num_shards=1)
    second = datasets.write(tmp_path / "b" / "toy", {"test": (6, 2)}, num_shards=1)
    out = tmp_path / "eval" / "metrics.json"
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--out", str(out),
                     "--data", f"{first},{second}"]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == {"a/toy": str(first), "b/toy": str(second)}
    frames = {key: r["all"]["frame"]["frames"] for key, r in report["results"].items()}
    assert frames == {"a/toy": 8, "b/toy": 8}
    fakes = {key: r["Deepfakes"]["video"]["videos"] for key, r in report["results"].items()}
    assert fakes["a/toy"] != fakes["b/toy"]
    for key in ("a__toy", "b__toy"):
        assert (out.parent / f"metrics_roc_{key}.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"a/toy: {first}" in printed and "| b/toy | all |" in printed
