"""Sweep files -> runs -> launch commands, and the sweep report built from run directories."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cae_jax import config as config_lib
from cae_jax import main, sweep, sweep_report

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = str(REPO / "cae_jax" / "config.py")
EXAMPLE_SWEEP = REPO / "launch" / "sweeps" / "recon_weight_x_lr.py"


def test_product_varies_first_sweep_slowest():
    points = sweep.product(sweep.sweep("a", [1, 2]), sweep.sweep("b", ["x", "y", "z"]))
    assert points == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 1, "b": "z"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
        {"a": 2, "b": "z"},
    ]


def test_zipit_pairs_and_nests_in_product():
    paired = sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [10, 20]))
    assert paired == [{"a": 1, "b": 10}, {"a": 2, "b": 20}]
    nested = sweep.product(sweep.sweep("c", [0]), paired)
    assert nested == [{"c": 0, "a": 1, "b": 10}, {"c": 0, "a": 2, "b": 20}]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: sweep.zipit(sweep.sweep("a", [1, 2]), sweep.sweep("b", [1])), "equal length"),
        (lambda: sweep.product(sweep.sweep("a", [1]), sweep.sweep("a", [2])), "swept twice"),
        (lambda: sweep.sweep("a", []), "no values"),
    ],
)
def test_malformed_sweeps_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_array_spec_compresses_consecutive_indices():
    assert sweep.array_spec([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert sweep.array_spec([3]) == "3"


def test_example_sweep_expands_to_runs_whose_overrides_round_trip(tmp_path):
    points = sweep.load_sweep(EXAMPLE_SWEEP)
    runs = sweep.expand(points, BASE_CONFIG, ["--config.train.steps=7"], str(tmp_path))
    assert len(runs) == 12
    assert [r.index for r in runs] == list(range(12))
    assert runs[5].overrides == {"loss.recon_weight": 0.5, "optim.learning_rate": 5e-4}
    assert runs[5].name == "005-recon_weight=0.5,learning_rate=0.0005"
    assert runs[5].workdir == str(tmp_path / runs[5].name)
    assert len({r.name for r in runs}) == 12
    # What `cae-jax train` will parse from the run's arguments is exactly the sweep point.
    assert runs[5].args[:5] == ["train", "--config", BASE_CONFIG, "--workdir", runs[5].workdir]
    config = config_lib.load_config(BASE_CONFIG, runs[5].args[5:])
    assert config.train.steps == 7
    assert config.loss.recon_weight == 0.5 and config.optim.learning_rate == 5e-4


def test_tuple_and_string_values_round_trip(tmp_path):
    points = sweep.product(
        sweep.sweep("model.decoder.features", [(64, 32), (16,)]),
        sweep.sweep("loss.recon", ["l1"]),
    )
    runs = sweep.expand(points, BASE_CONFIG, [], str(tmp_path))
    config = config_lib.load_config(BASE_CONFIG, runs[1].args[5:])
    assert config.model.decoder.features == (16,)
    assert config.loss.recon == "l1"
    assert runs[0].name == "000-features=64x32,recon=l1"


@pytest.mark.parametrize(
    "point, message",
    [({"loss.nope": 1.0}, "unknown config field --config.loss.nope"),
     ({"train.steps": "ten"}, "steps")],
)
def test_points_that_do_not_fit_the_config_fail_before_launch(tmp_path, point, message):
    with pytest.raises(ValueError, match=f"sweep point 0 .*{message}"):
        sweep.expand([point], BASE_CONFIG, [], str(tmp_path))


def write_sweep_file(path: Path, body: str) -> Path:
    path.write_text("from cae_jax.sweep import product, sweep, zipit\n\n" + body)
    return path


def test_sweep_file_must_define_get_sweep(tmp_path):
    bad = write_sweep_file(tmp_path / "bad.py", "POINTS = []\n")
    with pytest.raises(ValueError, match="bad.py: a sweep file defines get_sweep"):
        sweep.load_sweep(bad)


def fake_command(bin_dir: Path, name: str, log: Path) -> None:
    """An executable `name` that appends its arguments (one JSON list a line) to `log`."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)


def test_cli_writes_plan_and_refuses_to_overwrite_a_different_one(tmp_path, capsys, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    sbatch_log = tmp_path / "sbatch.log"
    fake_command(tmp_path / "bin", "sbatch", sbatch_log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    first = write_sweep_file(
        tmp_path / "one.py", "def get_sweep():\n    return sweep('loss.recon_weight', [0.1, 1.0])\n"
    )
    argv = ["sweep", str(first), "--config", BASE_CONFIG, "--workdir", str(sweep_dir)]
    assert main.main([*argv, "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert not (sweep_dir / "sweep.json").exists()  # A dry run writes nothing.
    assert len(printed) == 2 and printed[1].endswith("--config.loss.recon_weight=1.0")
    assert "-m cae_jax.main train --config" in printed[0]

    assert main.main([*argv, "--backend", "slurm", "--only", "1"]) == 0
    (submitted,) = [json.loads(line) for line in sbatch_log.read_text().splitlines()]
    assert "--array=1" in submitted
    assert submitted[-3:] == ["sweep", "--workdir", str(sweep_dir)]
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["overrides"] for r in plan["runs"]] == [
        {"loss.recon_weight": 0.1},
        {"loss.recon_weight": 1.0},
    ]
    before = (sweep_dir / "sweep.json").read_text()
    other = write_sweep_file(
        tmp_path / "two.py", "def get_sweep():\n    return sweep('loss.recon_weight', [2.0])\n"
    )
    assert main.main(["sweep", str(other), *argv[2:]]) == 2
    assert "holds a different sweep" in capsys.readouterr().err
    assert (sweep_dir / "sweep.json").read_text() == before


def test_slurm_backend_submits_one_array_that_slurm_sh_accepts(tmp_path, capsys):
    argv = ["sweep", str(EXAMPLE_SWEEP), "--config", BASE_CONFIG, "--workdir", str(tmp_path)]
    argv += ["--backend", "slurm", "--launcher-args", "--nodes 2 --per gpu", "--dry-run"]
    assert main.main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    command = line.split()
    assert command[0] == str(REPO / "launch" / "slurm.sh")
    assert command[command.index("--array") + 1] == "0-11"
    assert command[-4:] == ["--", "sweep", "--workdir", str(tmp_path)]
    # The launcher itself, in dry-run mode, turns it into the sbatch submission.
    result = subprocess.run(
        [command[0], "--dry-run", *command[1:]], capture_output=True, text=True, check=True
    )
    sbatch = result.stdout.split()
    assert sbatch[0] == "sbatch"
    assert "--array=0-11" in sbatch and "--nodes=2" in sbatch and "--ntasks-per-node=8" in sbatch
    assert sbatch[-3:] == ["sweep", "--workdir", str(tmp_path)]


def test_tpu_backend_runs_each_run_on_the_pod(tmp_path, capsys):
    argv = ["sweep", str(EXAMPLE_SWEEP), "--config", BASE_CONFIG, "--workdir", "gs://bucket/sw"]
    argv += ["--backend", "tpu", "--launcher-args", "--name pod --zone z", "--only", "0,11"]
    assert main.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(f"{REPO}/launch/tpu_pod.sh run --name pod --zone z -- train ")
    assert "--workdir gs://bucket/sw/011-recon_weight=2,learning_rate=0.0005 " in lines[1]


def test_run_index_runs_that_run_of_the_plan(tmp_path, monkeypatch):
    sweep_dir = str(tmp_path)
    runs = sweep.expand(sweep.load_sweep(EXAMPLE_SWEEP), BASE_CONFIG, [], sweep_dir)
    sweep.write_plan(sweep_dir, {"runs": [sweep.dataclasses.asdict(r) for r in runs]})
    calls = []
    real_main = main.main
    monkeypatch.setattr(main, "main", lambda argv: calls.append(argv) or 0)
    assert real_main(["sweep", "--workdir", sweep_dir, "--run-index", "4"]) == 0
    assert calls == [runs[4].args]
    assert real_main(["sweep", "--workdir", sweep_dir, "--run-index", "12"]) == 2


def test_test_data_adds_an_evaluation_after_training(tmp_path, capsys, monkeypatch):
    argv = ["sweep", str(EXAMPLE_SWEEP), "--config", BASE_CONFIG, "--workdir", str(tmp_path)]
    argv += ["--test-data", "/d/ffpp,/d/celebdf", "--only", "3"]
    assert main.main([*argv, "--dry-run"]) == 0
    train, evaluate = capsys.readouterr().out.splitlines()
    run_dir = tmp_path / "003-recon_weight=0.5,learning_rate=0.0001"
    assert f"cae_jax.main train --config {BASE_CONFIG} --workdir {run_dir} " in train
    assert evaluate.endswith(
        f"cae_jax.main evaluate --checkpoint {run_dir} --data /d/ffpp,/d/celebdf"
        f" --split test --out {run_dir}/test_metrics.json"
    )
    # An array task runs both, and skips the evaluation when training fails.
    runs = sweep.expand(sweep.load_sweep(EXAMPLE_SWEEP), BASE_CONFIG, [], str(tmp_path), "/d/ffpp")
    sweep.write_plan(str(tmp_path), {"runs": [sweep.dataclasses.asdict(r) for r in runs]})
    calls, status = [], {"train": 0}
    real_main = main.main
    monkeypatch.setattr(main, "main", lambda a: calls.append(a[0]) or status.get(a[0], 0))
    assert real_main(["sweep", "--workdir", str(tmp_path), "--run-index", "2"]) == 0
    status["train"] = 1
    assert real_main(["sweep", "--workdir", str(tmp_path), "--run-index", "2"]) == 1
    assert calls == ["train", "evaluate", "train"]


def test_local_execution_runs_every_command_and_reports_failure(tmp_path):
    def touch(name):
        return [sys.executable, "-c", f"open({str(tmp_path / name)!r}, 'w').write('ok')"]

    jobs = [
        [[sys.executable, "-c", "raise SystemExit(3)"], touch("evaluated-after-failure")],
        [touch("second-trained"), touch("second-evaluated")],
    ]
    assert sweep.execute(jobs, dry_run=False) == 1
    # A failed training skips its evaluation, not the runs after it.
    assert not (tmp_path / "evaluated-after-failure").exists()
    assert (tmp_path / "second-trained").exists() and (tmp_path / "second-evaluated").exists()
    assert sweep.execute(jobs[1:], dry_run=False) == 0


def test_sigterm_to_a_local_sweep_reaches_the_running_command(tmp_path):
    """Training checkpoints on SIGTERM, so a stopped sweep must pass it on, not orphan it."""
    marker = tmp_path / "child-got-sigterm"
    child = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), "
        "sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import sys\nfrom cae_jax import sweep\n"
        f"sys.exit(sweep.execute([[[sys.executable, '-c', {child!r}]]], dry_run=False))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.terminate()
    assert process.wait(timeout=30) == 128 + 15
    assert marker.exists()


# ---- sweep-report -------------------------------------------------------------------------


def evaluate_report(aucs: dict[str, float]) -> str:
    """What `cae-jax evaluate --out` writes, reduced to the fields the report reads."""
    results = {
        name: {"all": {"frame": {"auc": auc}, "video": {"auc": 0.5}}} for name, auc in aucs.items()
    }
    return json.dumps({"checkpoint": "x", "step": 200, "split": "test", "results": results})


def make_sweep_with_results(root: Path) -> list[sweep.Run]:
    points = sweep.product(sweep.sweep("loss.recon_weight", [0.5, 1.0, 2.0]))
    runs = sweep.expand(points, BASE_CONFIG, [], str(root), test_data="/data/ffpp")
    sweep.write_plan(str(root), {"runs": [sweep.dataclasses.asdict(r) for r in runs]})

    def write_run(run, steps, records, tail=""):
        Path(run.workdir).mkdir(parents=True)
        (Path(run.workdir) / "config.json").write_text(json.dumps({"train": {"steps": steps}}))
        text = "".join(json.dumps(r) + "\n" for r in records) + tail
        (Path(run.workdir) / "metrics.jsonl").write_text(text)

    # Run 0 finished and was tested; its best validation is at step 200.
    write_run(
        runs[0],
        300,
        [
            {"step": 50, "train/loss": 0.9},
            {"step": 100, "val_auc": 0.80},
            {"step": 200, "val_auc": 0.91},
            {"step": 300, "val_auc": 0.90},
        ],
    )
    (Path(runs[0].workdir) / "test_metrics.json").write_text(evaluate_report({"ffpp": 0.85}))
    # Run 1 is still running, its last line half-written.
    write_run(
        runs[1],
        1000,
        [{"step": 100, "val_auc": 0.95}, {"step": 200, "val_auc": 0.93}],
        tail='{"step": 300, "val_au',
    )
    # Run 2 has not started.
    return runs


def test_report_rows_rank_runs_by_best_validation(tmp_path):
    runs = make_sweep_with_results(tmp_path)
    rows = sweep_report.build_rows(str(tmp_path), "val_auc")
    simple = [{k: v for k, v in row.items() if k != "_curve"} for row in rows]
    assert simple == [
        {
            "index": 1,
            "name": runs[1].name,
            "loss.recon_weight": 1.0,
            "status": "running",
            "last_step": 200,
            "best_val_auc": 0.95,
            "best_step": 100,
        },
        {
            "index": 0,
            "name": runs[0].name,
            "loss.recon_weight": 0.5,
            "status": "tested",
            "last_step": 300,
            "best_val_auc": 0.91,
            "best_step": 200,
            "test_auc": 0.85,
        },
        {
            "index": 2,
            "name": runs[2].name,
            "loss.recon_weight": 2.0,
            "status": "not started",
            "last_step": None,
            "best_val_auc": None,
            "best_step": None,
        },
    ]
    assert rows[1]["_curve"] == [(100, 0.80), (200, 0.91), (300, 0.90)]


def test_report_status_and_one_column_per_test_dataset(tmp_path):
    runs = make_sweep_with_results(tmp_path)
    (Path(runs[0].workdir) / "test_metrics.json").unlink()
    (Path(runs[1].workdir) / "test_metrics.json").write_text(
        evaluate_report({"ffpp": 0.9, "celebdf": 0.7})
    )
    rows = {row["index"]: row for row in sweep_report.build_rows(str(tmp_path), "val_auc")}
    assert rows[0]["status"] == "trained" and "test_auc" not in rows[0]
    assert rows[1]["status"] == "tested"
    assert (rows[1]["test_auc/ffpp"], rows[1]["test_auc/celebdf"]) == (0.9, 0.7)
    table = sweep_report.to_markdown(sorted(rows.values(), key=lambda r: r["index"]))
    assert table.splitlines()[0].endswith("| test_auc/ffpp | test_auc/celebdf |")


def test_report_cli_writes_markdown_csv_and_plot(tmp_path, capsys):
    runs = make_sweep_with_results(tmp_path)
    assert main.main(["sweep-report", str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out == markdown
    assert markdown.splitlines() == [
        "| index | name | loss.recon_weight | status | last_step | best_val_auc | best_step"
        " | test_auc |",
        "|---|---|---|---|---|---|---|---|",
        f"| 1 | {runs[1].name} | 1 | running | 200 | 0.95 | 100 | - |",
        f"| 0 | {runs[0].name} | 0.5 | tested | 300 | 0.91 | 200 | 0.85 |",
        f"| 2 | {runs[2].name} | 2 | not started | - | - | - | - |",
    ]
    csv_lines = (tmp_path / "report.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "index,name,loss.recon_weight,status,last_step,best_val_auc,best_step,test_auc"
    )
    assert csv_lines[2] == f"0,{runs[0].name},0.5,tested,300,0.91,200,0.85"
    assert csv_lines[3] == f"2,{runs[2].name},2.0,not started,,,,"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("metrics.jsonl", "not json\n", "metrics.jsonl:2: not a JSON object"),
        ("test_metrics.json", "{}", "test_metrics.json: not a cae-jax evaluate report"),
    ],
)
def test_report_names_the_corrupt_file(tmp_path, capsys, file, content, message):
    runs = make_sweep_with_results(tmp_path)
    path = Path(runs[0].workdir) / file
    if file == "metrics.jsonl":
        lines = path.read_text().splitlines(keepends=True)
        content = lines[0] + content + "".join(lines[1:])
    path.write_text(content)
    assert main.main(["sweep-report", str(tmp_path)]) == 2
    assert f"{runs[0].workdir}/{message}" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_report_of_a_directory_without_plan_is_a_clear_error(tmp_path, capsys):
    assert main.main(["sweep-report", str(tmp_path)]) == 2
    assert f"{tmp_path}/sweep.json not found" in capsys.readouterr().err
