"""`cae-jax train --config configs/NAME.py --workdir DIR [--config.a.b=v ...]`: the trainer.

One flat loop (as in big_vision): resume from the workdir's latest checkpoint if any, run the
jitted train step, log, validate every `train.eval_every` steps, and checkpoint every
`train.checkpoint_every` steps (asynchronously), at validation steps, at the end and on
SIGTERM. Model selection uses the validation split only. Only process 0 writes logs.

Workdir: config.json and checkpoints/ (see checkpoints.py), metrics.jsonl (one JSON object
per logged step and per validation; on resume cut back to the restored step, so no step is
there twice), tensorboard/ (scalars and reconstruction grids). A resume whose config differs
from config.json in a field that fixes the run's meaning stops before touching anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tqdm import tqdm

from cae_jax import (
    atomic_file,
    checkpoints,
    dir_lock,
    distributed,
    evaluate,
    input_pipeline,
    pixels,
    prepared_data,
    saved_executable,
    tensorboard_writer,
    train_step,
)
from cae_jax import config as config_lib

ACCEPTS_CONFIG_OVERRIDES = True


class NonFiniteLossError(RuntimeError):
    """A train step produced a NaN/Inf loss or gradient and `train.nan_policy` is "stop"."""


class Logger:
    """metrics.jsonl + TensorBoard, written by process 0 only.

    metrics.jsonl first loses the records after `step` (those a killed run logged past its
    last checkpoint), so the resumed run's records for those steps are the only ones.
    """

    def __init__(self, workdir: epath.Path, step: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        path = workdir / "metrics.jsonl"
        truncate_records(path, step)
        self._jsonl = path.open("a")
        self._tensorboard = tensorboard_writer.SummaryWriter(workdir / "tensorboard")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._tensorboard.scalars(step, values)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.active:
            self._tensorboard.image(step, name, image)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tensorboard.close()


def truncate_records(path: epath.Path, step: int) -> None:
    """Keeps the records of `path` up to `step` (and drops a line torn by a kill), atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logging.warning("%s: dropped an unreadable line (a write cut short): %r", path, line)
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_file.write_text(path, "".join(kept))


class Preemption:
    """Turns SIGTERM into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def on_host(step_metrics: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-step metrics as Python floats: JSON-ready, and averaged in float64 alike whether
    they come from the devices or from a checkpoint's `log_window`."""
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(step_metrics)]


def recon_grid(images: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """uint8 inputs (top row) over their reconstructions (bottom row) as one uint8 image."""
    return np.concatenate([np.concatenate(list(x), axis=1)
                           for x in (images, pixels.to_uint8(recons))], axis=0)


def validate(config, eval_step, state, mesh, logger, step) -> dict[str, float]:
    """Validation metrics (`val_*`), logged, with a reconstruction grid of the first images.

    One pass over the split: `eval_step` (made `with_reconstructions=True`) scores every
    batch and the first batch's faces and reconstructions are kept for the grid.
    """
    scores = evaluate.score_split(config, eval_step, state, mesh,
                                  config_lib.eval_data_dir(config), config.input.eval_split,
                                  examples=config.train.recon_images)
    summary = evaluate.summarize(scores)["all"]
    values = {
        "val_auc": summary["frame"]["auc"],
        "val_acc": summary["frame"]["acc"],
        "val_eer": summary["frame"]["eer"],
        "val_ap": summary["frame"]["ap"],
        "val_video_auc": summary["video"]["auc"],
        "val_video_acc": summary["video"]["acc"],
        "val_recon_error": float(np.mean(scores["recon_error"])),
    }
    logger.scalars(step, values)
    if config.train.recon_images and len(scores["example_image"]):
        logger.image(step, "reconstruction",
                     recon_grid(scores["example_image"], scores["example_reconstruction"]))
    return values


def _has_validation(config: ConfigDict) -> bool:
    try:
        prepared_data.split_shards(config_lib.eval_data_dir(config), config.input.eval_split)
    except ValueError as err:
        logging.warning("No validation (%s); the latest checkpoint counts as the best.", err)
        return False
    return True


@contextlib.contextmanager
def sole_writer(workdir: epath.Path) -> Iterator[None]:
    """Process 0 holds the workdir's lock (dir_lock.py) while the block runs; every
    process stops, with process 0's reason, when it cannot. gs:// workdirs are not locked."""
    refusal = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0 and "://" not in str(workdir):
            try:
                dir_lock.make_directory(workdir, "--workdir")
                stack.enter_context(dir_lock.hold(workdir, "cae-jax train"))
            except dir_lock.DirectoryError as err:
                refusal = err
        if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
                np.int32(refusal is not None)):
            refusal = refusal or dir_lock.DirectoryError(
                f"--workdir {workdir}: process 0 could not lock it (its error says why)")
        if refusal:
            raise refusal
        yield


def train(config: ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains (or resumes) to `config.train.steps`; returns the last logged metrics."""
    workdir = checkpoints.as_path(workdir)
    config_lib.validate(config)
    if not config.input.train_dirs:
        raise ValueError("config.input.train_dirs is empty: nothing to train on")
    if config.train.executable:  # A wrong path stops here, before the workdir is made.
        saved_executable.read_manifest(config.train.executable)
    # The manager is closed on every exit, early errors included (left open, its threads
    # die with a traceback).
    with sole_writer(workdir), checkpoints.make_manager(workdir, config) as manager:
        return _train(config, workdir, manager)


def _train(config: ConfigDict, workdir: epath.Path,
           manager: ocp.CheckpointManager) -> dict[str, float]:
    program = train_step.build_program(config, jax.devices())
    if config.train.executable:
        saved = saved_executable.load(config.train.executable, config, program, jax.devices())
        if saved and jax.process_index() == 0:
            tqdm.write(f"loaded the compiled train and eval steps from {config.train.executable}")
        program = saved or program
    mesh = program.abstract.mesh
    latest = manager.latest_step()
    if latest is not None:
        checkpoints.check_resumable(workdir, config)
    checkpoints.write_config(workdir, config)
    data = input_pipeline.make_train_iterator(config, mesh)
    abstract, step_fn, eval_step = program.abstract, program.train_step, program.eval_step
    with_validation = _has_validation(config)

    pending = []  # Per-step metrics since the last record.
    if latest is None:
        state = train_step.create_train_state(config, abstract)
    else:
        state, latest = checkpoints.restore_newest_intact(manager, abstract.shapes, data)
        pending = checkpoints.unlogged_metrics(manager, latest)
        if jax.process_index() == 0:
            tqdm.write(f"resumed from {workdir / checkpoints.CHECKPOINT_DIR} at step {latest}")
    step = int(state.step)
    total = config.train.steps
    if step >= total and jax.process_index() == 0:
        tqdm.write(f"nothing to train: the checkpoint in {workdir / checkpoints.CHECKPOINT_DIR} "
                   f"is at step {step} and train.steps={total}; pass a larger "
                   "--config.train.steps to train on", file=sys.stderr)
    logger = Logger(workdir, step)
    preemption = Preemption()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    last = {}
    warned_undefined_auc = False
    tick, tick_step = time.perf_counter(), step
    try:
        while step < total:
            state, step_metrics = step_fn(state, next(data))
            step += 1
            pending.append(step_metrics)
            bar.update(1)
            validate_now = with_validation and (step % config.train.eval_every == 0
                                                or step == total)
            # A record closes at every log step and scheduled save. A preemption between them
            # saves the open window with the checkpoint instead, so that a resumed run's
            # records are the uninterrupted run's.
            scheduled_save = (step % config.train.checkpoint_every == 0 or step == total
                              or validate_now)
            preempted = preemption.requested or manager.reached_preemption(step)
            if step % config.train.log_every == 0 or scheduled_save:
                fetched = on_host(pending)
                pending = []
                bad = [m for m in fetched if not m["finite"]]
                if bad and config.train.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient before step {step} (loss={bad[0]['loss']}, "
                        f"grad_norm={bad[0]['grad_norm']}); parameters were not updated by it. "
                        f"The last good checkpoint is kept in {manager.directory}. Set "
                        "--config.train.nan_policy=skip to skip such steps instead."
                    )
                now = time.perf_counter()
                seconds = (now - tick) / max(step - tick_step, 1)
                last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
                last.update(skipped_steps=float(len(bad)), step_time=seconds,
                            images_per_second=config.train.batch_size / seconds)
                logger.scalars(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                tick, tick_step = now, step
            try:
                val = validate(config, eval_step, state, mesh, logger, step) \
                    if validate_now else None
            except (ValueError, OSError) as err:  # A corrupt or unreadable validation record.
                checkpoints.save(manager, step, state, data)  # Unscored; the training is kept.
                raise ValueError(f"validation at step {step} failed ({err}); the step's "
                                 "checkpoint is saved, a resume continues after it") from err
            if val:
                last.update(val)
                tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            selection = None
            if val and math.isfinite(val["val_auc"]):
                selection = {checkpoints.BEST_METRIC: val["val_auc"]}
            elif val and not warned_undefined_auc:
                warned_undefined_auc = True
                logging.warning("Validation AUC is NaN at step %d (one class in the split?): "
                                "such steps are saved without a score and never selected as "
                                "best.", step)
            if scheduled_save or preempted:
                checkpoints.save(manager, step, state, data, metrics=selection,
                                 log_window=on_host(pending))
            if preempted:
                logging.warning("Preempted at step %d: checkpoint saved, exiting.", step)
                break
    finally:
        bar.close()
        manager.wait_until_finished()
        data.close()
        logger.close()
        preemption.restore()
    return last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config()")
    parser.add_argument("--workdir", required=True,
                        help="run directory: config.json, checkpoints/, metrics.jsonl, "
                        "tensorboard/; an existing one is resumed")
    parser.epilog = "Config fields are overridden with --config.a.b=value (repeatable)."


def run(args: argparse.Namespace) -> int:
    distributed.initialize_from_env()  # Before any JAX computation; no-op on one process.
    try:
        config = config_lib.load_config(args.config, args.overrides)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    try:
        final = train(config, args.workdir)
    except (NonFiniteLossError, FileNotFoundError, ValueError,
            dir_lock.DirectoryError) as err:
        raise SystemExit(f"error: {err}") from err
    except OSError as err:  # A full disk (checkpoints.check_free_space) or an unwritable file.
        raise SystemExit(f"error: {err.strerror or err}"
                         + (f": {err.filename}" if err.filename else "")) from err
    if jax.process_index() == 0:
        print(json.dumps({"workdir": str(args.workdir), **final}))
    return 0
