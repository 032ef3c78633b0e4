"""Trainer: SIGKILL or SIGTERM + resume equals an uninterrupted run; resume refuses another
config; NaN policies and NaN validation AUCs; train then evaluate."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compilation_cache

from cae_jax import (
    checkpoints,
    eval_pipeline,
    main,
    models,
    saved_executable,
    sharding,
    train,
    train_step,
)
from cae_jax.config import load_config
from tests import datasets

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


def overrides(data_dir: Path) -> list[str]:
    return [
        f"--config.input.train_dirs=('{data_dir}',)",
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=4",
        "--config.train.eval_every=6",
        "--config.train.log_every=2",
        "--config.train.keep_checkpoints=10",  # Step 4 stays for the NaN-policy test.
    ]


def config_for(data_dir: Path, **train_fields):
    config = load_config(ROOT / "configs" / "tiny.py", overrides(data_dir))
    config.train.update(train_fields)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return datasets.write(root / "toy", {"train": (16, 16), "validation": (8, 8), "test": (8, 8)})


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: (workdir, final metrics)."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train(config_for(data_dir), workdir)


def arrays(workdir: Path, step: int):
    _, params, stats, _ = checkpoints.restore_inference(workdir / "checkpoints" / str(step))
    return [np.asarray(x) for x in jax.tree.leaves((params, stats))]


def full_state(workdir: Path, config, step: int) -> train_step.TrainState:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    return checkpoints.restore_state(workdir / "checkpoints" / str(step),
                                     train_step.abstract_state(config, mesh).shapes)


def assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def validation_records(workdir: Path) -> list[dict]:
    return [r for r in records(workdir) if "val_auc" in r]


def deterministic(record: dict) -> dict:
    """A metrics record without its wall-clock fields."""
    return {k: v for k, v in record.items() if k not in ("step_time", "images_per_second")}


def instrument_steps(monkeypatch, nan_at: tuple[int, ...] = (),
                     sigterm_at: int | None = None) -> list[int]:
    """Records the step each train-step call produces; feeds NaN images to those in `nan_at`;
    sends this process SIGTERM (a preemption notice) during step `sigterm_at`."""
    make = train_step.make_train_step
    produced = []

    def make_instrumented(config, abstract):
        step_fn = make(config, abstract)

        def step(state, batch):
            produced.append(int(state.step) + 1)
            if produced[-1] in nan_at:
                batch = {**batch, "image": batch["image"] * jnp.nan}
            if produced[-1] == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return step

    monkeypatch.setattr(train_step, "make_train_step", make_instrumented)
    return produced


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_a_signal_equals_uninterrupted_run(sig, reference, data_dir, tmp_path,
                                                        monkeypatch):
    ref_dir, ref_final = reference
    workdir = tmp_path / "stopped"
    command = [sys.executable, "-m", "cae_jax.main", "train", "--config",
               str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir), *overrides(data_dir)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    step_dir = workdir / "checkpoints" / "4"
    deadline = time.time() + 600
    while not step_dir.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(sig)
    stderr = process.communicate(timeout=600)[1]
    assert step_dir.is_dir(), "the run died before its first checkpoint"
    stopped_at = saved_steps(workdir)[-1]
    assert stopped_at < STEPS, "the run finished before the signal"
    if sig == signal.SIGTERM:
        # Preemption: a checkpoint at the step it stopped, exit status 0, the records so far.
        assert process.returncode == 0, stderr
        assert f"Preempted at step {stopped_at}: checkpoint saved" in stderr
        assert ([deterministic(r) for r in records(workdir)]
                == [deterministic(r) for r in records(ref_dir) if r["step"] <= stopped_at])
    else:
        assert process.returncode == -signal.SIGKILL
        # What a kill between a checkpoint and the next one leaves: records past the
        # checkpoint and a line cut short.
        with (workdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": stopped_at + 1, "loss": 123.0}) + '\n{"step": ')

    produced = instrument_steps(monkeypatch)
    final = train.train(config_for(data_dir), workdir)

    assert produced == list(range(stopped_at + 1, STEPS + 1)), "resumed, not restarted"
    assert_trees_equal(full_state(workdir, config_for(data_dir), STEPS),
                       full_state(ref_dir, config_for(data_dir), STEPS))
    for key in ("val_auc", "val_eer", "val_ap", "val_recon_error", "loss", "bce", "recon"):
        assert final[key] == ref_final[key], key
    # Every step's record once, with the values of the uninterrupted run.
    assert ([deterministic(r) for r in records(workdir)]
            == [deterministic(r) for r in records(ref_dir)])


def test_preemption_between_records_resumes_the_open_record(reference, data_dir, tmp_path,
                                                             monkeypatch):
    """Step 5 is neither a log step nor a scheduled save: its metrics travel with the
    preemption checkpoint, and the resumed run's record at step 6 averages steps 5 and 6 as
    the uninterrupted run's does."""
    ref_dir, _ = reference
    workdir = tmp_path / "preempted"
    with monkeypatch.context() as patch:
        instrument_steps(patch, sigterm_at=5)
        train.train(config_for(data_dir), workdir)
    assert saved_steps(workdir) == [4, 5]
    assert [r["step"] for r in records(workdir)] == [2, 4]

    produced = instrument_steps(monkeypatch)
    train.train(config_for(data_dir), workdir)
    assert produced == list(range(6, STEPS + 1))
    assert ([deterministic(r) for r in records(workdir)]
            == [deterministic(r) for r in records(ref_dir)])


def test_resume_with_another_model_config_stops_and_keeps_config_json(reference, data_dir,
                                                                      tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    before = (workdir / "config.json").read_bytes()
    command = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
               str(workdir), *overrides(data_dir), "--config.model.encoder.middle_blocks=2",
               "--config.seed=3", "--config.input.workers=1",
               "--config.train.eval_every=3"]  # eval_every may change.
    with pytest.raises(SystemExit, match=r"config\.json: its checkpoints were trained with "
                       r"another config \(input\.workers: 0 in config\.json, 1 now; "
                       r"model\.encoder\.middle_blocks: 1 in config\.json, 2 now; "
                       r"seed: 0 in config\.json, 3 now\)"):
        main.main(command)
    assert (workdir / "config.json").read_bytes() == before
    assert saved_steps(workdir) == saved_steps(reference[0])

    # Fields that leave the checkpoints' meaning alone may change; config.json records them.
    resumable = config_for(data_dir, eval_every=3, log_every=1, checkpoint_every=2)
    resumable.input.threads, resumable.input.prefetch_batches = 2, 1
    train.train(resumable, workdir)
    assert checkpoints.read_config(workdir).train.eval_every == 3


class CountedCalls:
    """A jitted step that counts the calls that would compile and run it (lowering is free)."""

    def __init__(self, jitted):
        self.jitted, self.calls = jitted, 0

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        self.calls += 1
        return self.jitted(*args)


def count_step_calls(monkeypatch) -> list[train_step.Program]:
    """The programs `build_program` makes from now on, their jitted steps counting calls."""
    build, built = train_step.build_program, []

    def counted(config, devices):
        program = build(config, devices)
        built.append(dataclasses.replace(program, train_step=CountedCalls(program.train_step),
                                         eval_step=CountedCalls(program.eval_step)))
        return built[-1]

    monkeypatch.setattr(train_step, "build_program", counted)
    return built


@pytest.fixture(scope="module")
def saved_steps_dir(data_dir, tmp_path_factory):
    """The train and eval steps of `config_for(data_dir)` compiled for this host's 8 CPU
    devices and saved as `cae-jax compile --save-executable` saves them."""
    config = config_for(data_dir)
    program = train_step.build_program(config, jax.devices())
    # Compiled afresh, as `cae-jax compile --save-executable` does: XLA:CPU's executables
    # read back from the persistent compilation cache serialize without some kernels.
    with mock.patch.object(compilation_cache, "is_cache_used", lambda backend: False):
        steps = {name: (lowered, lowered.compile())
                 for name, lowered in train_step.lower_steps(config, program).items()}
    directory = tmp_path_factory.mktemp("executable") / "cpu-8"
    saved_executable.save(directory, jax.devices(), steps, "cpu-8")
    return directory


def test_a_saved_executable_trains_without_compiling_and_equals_a_compiled_run(
        reference, data_dir, saved_steps_dir, tmp_path, monkeypatch, capsys):
    ref_dir, ref_final = reference
    built = count_step_calls(monkeypatch)
    workdir = tmp_path / "loaded"
    final = train.train(config_for(data_dir, executable=str(saved_steps_dir)), workdir)

    assert f"loaded the compiled train and eval steps from {saved_steps_dir}" in \
        capsys.readouterr().out
    assert (built[0].train_step.calls, built[0].eval_step.calls) == (0, 0)
    assert_trees_equal(full_state(workdir, config_for(data_dir), STEPS),
                       full_state(ref_dir, config_for(data_dir), STEPS))
    assert ([deterministic(r) for r in records(workdir)]
            == [deterministic(r) for r in records(ref_dir)])
    assert final["val_auc"] == ref_final["val_auc"]


def test_a_saved_executable_for_other_versions_is_refused_by_name_then_compiled(
        reference, data_dir, saved_steps_dir, tmp_path, monkeypatch, caplog):
    ref_dir, _ = reference
    other = tmp_path / "other-jax"
    shutil.copytree(saved_steps_dir, other)
    manifest = json.loads((other / saved_executable.MANIFEST).read_text())
    manifest["versions"]["jax"] = "0.4.1"
    (other / saved_executable.MANIFEST).write_text(json.dumps(manifest))
    built = count_step_calls(monkeypatch)
    workdir = tmp_path / "compiled"
    with caplog.at_level(logging.WARNING):
        train.train(config_for(data_dir, executable=str(other)), workdir)

    assert [r.getMessage() for r in caplog.records if "executable" in r.getMessage()] == [
        f"--config.train.executable={other}: saved for jax 0.4.1, running "
        f"{jax.__version__}; compiling as usual."]
    assert built[0].train_step.calls == STEPS
    assert_trees_equal(full_state(workdir, config_for(data_dir), STEPS),
                       full_state(ref_dir, config_for(data_dir), STEPS))


def test_a_saved_executable_of_another_program_or_no_executable_dir_is_named(
        data_dir, saved_steps_dir, tmp_path, caplog):
    """Another batch size is another program: found by lowering, before any compile."""
    config = config_for(data_dir, batch_size=16)
    program = train_step.build_program(config, jax.devices())
    with caplog.at_level(logging.WARNING):
        assert saved_executable.load(saved_steps_dir, config, program, jax.devices()) is None
    assert caplog.records[-1].getMessage() == (
        f"--config.train.executable={saved_steps_dir}: saved for another program (this run's "
        "train step differs: its config or input shapes); compiling as usual.")
    command = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
               str(tmp_path / "run"), *overrides(data_dir),
               f"--config.train.executable={tmp_path}"]
    with pytest.raises(SystemExit, match=rf"^error: --config.train.executable={tmp_path}: "
                       r"no executable.json there \(a directory written by `cae-jax compile "
                       r"--save-executable`\)$"):
        main.main(command)
    assert not (tmp_path / "run").exists()


def test_best_checkpoint_is_chosen_by_validation_auc(reference):
    ref_dir, _ = reference
    records = validation_records(ref_dir)
    assert [r["step"] for r in records] == [6, 12]
    best = max(records, key=lambda r: (r["val_auc"], -r["step"]))
    assert checkpoints.restore_inference(ref_dir)[3] == best["step"]


def test_train_then_evaluate_cli(reference, data_dir, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "eval" / "metrics.json"
    step_dir = ref_dir / "checkpoints" / str(STEPS)
    assert main.main(["evaluate", "--checkpoint", str(step_dir), "--data", str(data_dir),
                      "--split", "validation", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["results"][data_dir.name]
    # The trainer's last validation scored the same checkpoint on the same split.
    last = validation_records(ref_dir)[-1]
    assert result["all"]["frame"]["auc"] == pytest.approx(last["val_auc"], abs=1e-12)
    assert result["all"]["video"]["auc"] == pytest.approx(last["val_video_auc"], abs=1e-12)
    assert result["all"]["frame"]["frames"] == 16
    assert set(result) == {"all", "Deepfakes"}
    assert (out.parent / "metrics_table.md").read_text().count("| toy |") == 2
    assert (out.parent / "metrics_roc_toy.png").stat().st_size > 1000


def test_nan_stop_keeps_the_last_good_checkpoint(reference, data_dir, tmp_path, monkeypatch):
    ref_dir, _ = reference
    config = config_for(data_dir)
    instrument_steps(monkeypatch, nan_at=(5, 6))  # After the checkpoint at step 4.
    with pytest.raises(train.NonFiniteLossError, match="before step 6 .*last good checkpoint"):
        train.train(config, tmp_path / "stop")
    assert saved_steps(tmp_path / "stop") == [4]  # Step 6 (a validation step) was not saved.
    assert_trees_equal(full_state(tmp_path / "stop", config, 4), full_state(ref_dir, config, 4))


def test_nan_skip_leaves_params_statistics_and_optimizer_untouched(data_dir, tmp_path,
                                                                   monkeypatch):
    config = config_for(data_dir, steps=6, eval_every=100, checkpoint_every=1, log_every=1,
                        nan_policy="skip")
    instrument_steps(monkeypatch, nan_at=(5,))
    train.train(config, tmp_path / "skip")
    before, skipped, after = (full_state(tmp_path / "skip", config, s) for s in (4, 5, 6))
    assert (int(before.step), int(skipped.step)) == (4, 5)
    assert_trees_equal((skipped.params, skipped.batch_stats, skipped.opt_state),
                       (before.params, before.batch_stats, before.opt_state))
    with pytest.raises(AssertionError):  # Training went on after the skipped step.
        assert_trees_equal(after.params, skipped.params)
    logged = [r for r in records(tmp_path / "skip") if "skipped_steps" in r]
    assert [(r["step"], r["skipped_steps"]) for r in logged] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 0)]


def test_nan_validation_auc_never_selects_a_step(tmp_path, caplog):
    one_class = datasets.write(tmp_path / "real_only", {"train": (8, 8), "validation": (8, 0)})
    config = config_for(one_class, steps=4, eval_every=2, checkpoint_every=2, log_every=2)
    with caplog.at_level(logging.WARNING):
        train.train(config, tmp_path / "run")
    assert [np.isnan(r["val_auc"]) for r in validation_records(tmp_path / "run")] == [True, True]
    assert sum("Validation AUC is NaN" in r.getMessage() for r in caplog.records) == 1
    assert saved_steps(tmp_path / "run") == [2, 4]
    assert checkpoints.restore_inference(tmp_path / "run")[3] == 4  # The latest, not the first.


class RecordingLogger:
    """Stands in for `train.Logger`: keeps what validation logs."""

    def __init__(self):
        self.scalars_logged, self.images = [], {}

    def scalars(self, step, values):
        self.scalars_logged.append((step, values))

    def image(self, step, name, image):
        self.images[name] = image


def test_validation_reads_the_split_once_and_draws_the_grid_from_that_pass(data_dir,
                                                                           monkeypatch):
    config = config_for(data_dir, recon_images=5)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    eval_step = train_step.make_eval_step(config, abstract, with_reconstructions=True)
    make_iterator = eval_pipeline.make_eval_iterator
    opened = []

    def counting_iterator(*args, **kwargs):
        opened.append(args[2:])
        return make_iterator(*args, **kwargs)

    monkeypatch.setattr(eval_pipeline, "make_eval_iterator", counting_iterator)
    logger = RecordingLogger()
    values = train.validate(config, eval_step, state, mesh, logger, step=3)
    assert opened == [(str(data_dir), "validation")]
    assert logger.scalars_logged == [(3, values)]

    # The grid equals one drawn from a separate forward pass over the same first batch.
    first = next(iter(make_iterator(config, mesh, str(data_dir), "validation")))
    images = np.asarray(first["image"])[:5]
    recons = jax.jit(lambda s, x: models.forward(
        abstract.graphdef, s.params, s.batch_stats, x, train=False)[0]["reconstruction"])(
            state, images)
    expected = train.recon_grid(images, np.asarray(recons))
    grid = logger.images["reconstruction"]
    assert grid.shape == expected.shape == (2 * 64, 5 * 64, 3)
    half = grid.shape[0] // 2
    np.testing.assert_array_equal(grid[:half], expected[:half])  # The same input faces.
    # Reconstructions from another program layout: at most one uint8 rounding step apart.
    assert np.abs(grid[half:].astype(int) - expected[half:]).max() <= 1
