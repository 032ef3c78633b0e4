"""Workdir layout and Orbax checkpoints: resumable training state and inference restores.

A training workdir holds:
  WORKDIR/config.json          the run's full config (`config.to_json`); a resume may change
                               only the RESUMABLE fields in it (`check_resumable`)
  WORKDIR/checkpoints/<step>/  one Orbax Composite per saved step:
      state/                   the `TrainState` pytree (step, params, batch_stats, opt_state)
      data/                    the grain iterator position of each host (JSON per process)
      log_window/              only where a preemption stopped between two metrics records:
                               the per-step metrics since the last one, so the resumed run's
                               next record covers the same steps an uninterrupted run's would
    plus Orbax metadata with the step's metrics, {"val_auc": ...} when validation ran there.

Orbax writes a step into a temporary directory and renames it when complete, so a run killed
mid-save leaves no step a later run would pick up. Kept: the last `train.keep_checkpoints`
steps and the best one by validation AUC (model selection never looks at the test split).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from cae_jax import atomic_file
from cae_jax import config as config_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
LOG_WINDOW_ITEM = "log_window"
ITEM_NAMES = (STATE_ITEM, DATA_ITEM, LOG_WINDOW_ITEM)
BEST_METRIC = "val_auc"  # Validation frame-level AUC; higher is better.
# Config fields a resumed run may change: how long, how often it logs, validates and saves, how
# the input is read and how the same arrays are laid out and computed. Every other field
# (model shapes, loss, optimizer, schedule warmup, seed, data, batch size) is the run's meaning;
# so is input.workers: each worker count gives other batches and another saved data position.
RESUMABLE = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.nan_policy", "train.recon_images", "train.executable",
    "input.threads", "input.buffer", "input.prefetch_batches",
    "input.eval_batch_size", "input.skip_corrupt",
    "model.layer_impl", "mesh.data", "mesh.fsdp",
})

# Orbax saves a replicated array from all its replicas at once ("replica-parallel"), cutting
# it into one device slice per replica, each sliced by its own dispatch. A train state is
# mostly small arrays (BatchNorm vectors, biases and their optimizer moments), for which that
# costs more than it spreads: a tiny model on 8 devices spent 1.7 s of each save slicing.
# Arrays whose slice would be smaller than this are written whole by one replica.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


@contextlib.contextmanager
def _orbax_warnings_off() -> Iterator[None]:
    """Orbax's warnings (absl's logger) held back for a call whose outcome this module reports."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _replica_parallel_for_large_arrays_only() -> None:
    with _orbax_warnings_off():  # Orbax warns of the override it is asked for.
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array),
                                         "_array_metadata_store", None),
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES),
            override=True)


_replica_parallel_for_large_arrays_only()


class AnotherModelError(ValueError):
    """A step's arrays do not fit the model its workdir's config.json describes."""


class ConfigMismatchError(ValueError):
    """A workdir's checkpoints were written under a config that differs in fixed fields."""


def as_path(path: str | os.PathLike) -> epath.Path:
    """A workdir-style path: local ones made absolute (Orbax needs that), gs:// ones kept.

    `pathlib` would turn gs://bucket/run into the local gs:/bucket/run, and so would
    `epath.Path.absolute()`; URIs count as absolute already.
    """
    path = epath.Path(path)
    return path if path.is_absolute() else path.absolute()


def write_config(workdir: str | os.PathLike, config: ConfigDict) -> None:
    """Writes WORKDIR/config.json (process 0 only), atomically."""
    if jax.process_index() != 0:
        return
    path = as_path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file.write_text(path, config_lib.to_json(config))


def read_config(workdir: str | os.PathLike) -> ConfigDict:
    """The run's config, merged onto today's defaults (`config.from_saved`: fields added
    since it was written take their defaults) and checked as a config file is
    (`config.validate`): evaluate, export and predict build models from it, so a hand-edited
    or foreign file fails here, named."""
    path = as_path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {workdir} a training workdir?")
    try:
        config = config_lib.from_saved(json.loads(path.read_text()), str(path))
        config_lib.validate(config)
    except (json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a config written by cae-jax train ({err})") from err
    return config


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: JSON value} of a config dict (tuples as lists, as config.json holds them)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(node))}


def check_resumable(workdir: str | os.PathLike, config: ConfigDict) -> None:
    """Raises ConfigMismatchError naming each fixed field where `config` differs from the
    workdir's config.json, which is left as it is; see RESUMABLE."""
    saved = _flat(read_config(workdir).to_dict())
    given = _flat(config.to_dict())
    missing = object()
    differ = sorted(key for key in saved.keys() | given.keys()
                    if key not in RESUMABLE and saved.get(key, missing) != given.get(key, missing))
    if differ:
        show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"  # noqa: E731
        fields = "; ".join(f"{k}: {show(saved, k)} in config.json, {show(given, k)} now"
                           for k in differ)
        raise ConfigMismatchError(
            f"{as_path(workdir) / CONFIG_FILE}: its checkpoints were trained with another config "
            f"({fields}). A resume may change only {', '.join(sorted(RESUMABLE))}; "
            "train the new config in a new --workdir."
        )


def validation_auc(metrics: dict[str, float]) -> float:
    """A step's selection score: its validation AUC, -inf where that is NaN (one class)."""
    value = float(metrics[BEST_METRIC])
    return value if math.isfinite(value) else -math.inf


def make_manager(workdir: str | os.PathLike, config: ConfigDict) -> ocp.CheckpointManager:
    """Asynchronous manager keeping the last K steps plus the best by validation AUC."""
    policy = ocp.checkpoint_managers
    preservation = policy.AnyPreservationPolicy([
        policy.LatestN(n=config.train.keep_checkpoints),
        policy.BestN(get_metric_fn=validation_auc, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=validation_auc,  # Orbax stores a step's metrics only when it tracks a best.
        best_mode="max",
        preservation_policy=preservation,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    manager = ocp.CheckpointManager(
        as_path(workdir) / CHECKPOINT_DIR,
        item_names=ITEM_NAMES,
        options=options,
    )
    # Orbax removes an earlier run's unfinished steps in a thread that `close()` does not wait
    # for (the first save does): a run stopped by a bad input right after this would exit
    # under it, and on Python 3.13 the thread dies with a traceback. Wait here; it lists one
    # directory (test_train_errors catches a change).
    wait_for_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None:
        wait_for_cleanup()
    return manager


def check_free_space(manager: ocp.CheckpointManager) -> None:
    """Raises OSError (ENOSPC) where the disk lacks room for two more steps as large as the
    newest (a save writes beside the step still being written, and logs grow too): said
    before the save, in one line, not by Orbax's writer thread at the save after it. gs://
    workdirs are not checked."""
    if "://" in str(manager.directory):
        return
    directory = Path(manager.directory)
    written = [directory / str(s) for s in sorted(manager.all_steps(), reverse=True)
               if (directory / str(s)).is_dir()]  # A step still being saved has a tmp name.
    if not written:
        return
    need = 2 * sum(f.stat().st_blocks * 512 for f in written[0].rglob("*") if f.is_file())
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{directory}: disk full ({free / 2**20:.1f} MiB free, a "
                      f"checkpoint needs {need / 2**20:.1f} MiB); free space, then resume")


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
    metrics: dict[str, float] | None = None,
    log_window: list[dict[str, float]] | None = None,
) -> bool:
    """Starts an asynchronous save of the train state and data position at `step`, after
    `check_free_space`; `log_window` holds the per-step metrics not yet in a record."""
    import grain

    check_free_space(manager)
    items = {
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: grain.checkpoint.CheckpointSave(data_iterator),
    }
    if log_window:
        items[LOG_WINDOW_ITEM] = ocp.args.JsonSave({"steps": log_window})
    return manager.save(
        step,
        args=ocp.args.Composite(**items),
        metrics=metrics,
        force=True,
    )


def restore_train(
    manager: ocp.CheckpointManager, step: int, target: Any, data_iterator: Any
) -> Any:
    """The train state at `step` laid out as `target` (ShapeDtypeStructs with shardings:
    `train_step.abstract_state(...).shapes`); moves `data_iterator` there.

    The data position is per host (grain writes process_<i>-of-<n>.json) and each host
    reads its own shards, so a run resumed on a different number of processes cannot
    continue the saved order: it restores the state alone, warns, and starts its data
    afresh under the new host layout. Step, schedule and model continue either way.
    """
    import grain

    position = (manager.directory / str(step) / DATA_ITEM
                / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    check_saved_shapes(manager.directory / str(step), target)
    items = {STATE_ITEM: ocp.args.StandardRestore(target)}
    if position.exists():
        items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
        logging.warning(
            "%s: no data position for %d processes (the checkpoint was written by a different "
            "number); restoring the train state only, the input restarts its shuffled order.",
            position.parent, jax.process_count())
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]


def unlogged_metrics(manager: ocp.CheckpointManager, step: int) -> list[dict[str, float]]:
    """The per-step metrics `step` saved past its run's last record (`save`'s `log_window`);
    empty for a step saved at a record, and for checkpoints of releases before it."""
    if not (manager.directory / str(step) / LOG_WINDOW_ITEM).exists():
        return []
    restored = manager.restore(step, args=ocp.args.Composite(
        **{LOG_WINDOW_ITEM: ocp.args.JsonRestore()}))
    return restored[LOG_WINDOW_ITEM]["steps"]


def restore_newest_intact(manager: ocp.CheckpointManager, target: Any,
                          data_iterator: Any) -> tuple[Any, int]:
    """`restore_train` of the newest step that reads back, and its step number.

    A step whose files were partly deleted (or damaged) is named in a warning and set aside
    as `<step>.unreadable` (so the resumed run can save that step again); the step before it
    is tried next. Raises ValueError when none reads.
    """
    _ignore_abandoned_reads()  # Before: they may be printed before the failure is raised.
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore_train(manager, step, target, data_iterator), step
        except AnotherModelError:
            raise  # Intact, and not this run's: no earlier step would fit either.
        except Exception as err:
            # tensorstore's errors are ValueErrors and OSErrors; Orbax wraps a failed array
            # read in a bare Exception. Anything else is a fault here, not in the step.
            wrapped = type(err) is Exception
            if not (wrapped or isinstance(err, (ValueError, OSError))):
                raise
            reason = err.__cause__ if wrapped and err.__cause__ else err
            broken = manager.directory / str(step)
            logging.warning("%s: unreadable (%s); set aside as %s.unreadable, resuming from "
                            "an earlier step", broken, str(reason).splitlines()[0][:200], step)
            if jax.process_index() == 0:
                broken.rename(broken.parent / f"{step}.unreadable")
            manager.reload()
    raise ValueError(f"{manager.directory}: no checkpoint reads back (see the warnings); "
                     "move it away to train afresh")


@functools.cache  # Once per process: each call would wrap the hooks again.
def _ignore_abandoned_reads() -> None:
    """Keeps quiet what a restore that failed part-way leaves behind.

    Orbax reads a step's arrays concurrently on an event loop that it closes as soon as one
    read fails. The reads still in flight cannot report back as each finishes: tensorstore
    prints an "Event loop is closed" traceback for each (hundreds for one step), and asyncio
    logs the errors of the other failed reads as never retrieved. The warning naming the
    step says what they would.
    """
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous_hook(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not record.getMessage().startswith("Task exception was never retrieved"))


def validation_scores(manager: ocp.CheckpointManager) -> dict[int, float]:
    """{step: validation AUC} of the kept steps validated with a finite AUC.

    A NaN AUC (a validation split with one class) ranks nothing, so such steps are left out,
    with one warning naming them.
    """
    scores, undefined = {}, []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and BEST_METRIC in metrics:
            value = float(metrics[BEST_METRIC])
            if math.isfinite(value):
                scores[step] = value
            else:
                undefined.append(step)
    if undefined:
        logging.warning("%s: steps %s have no finite validation AUC; not selected by it.",
                        manager.directory, undefined)
    return scores


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The kept step with the highest validation AUC (earliest on ties), else the latest."""
    scores = validation_scores(manager)
    if scores:
        return max(sorted(scores), key=lambda step: scores[step])
    return manager.latest_step()


def resolve(path: str | os.PathLike) -> tuple[epath.Path, epath.Path]:
    """(workdir, step directory) for a workdir or one step directory in it."""
    path = as_path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        with ocp.CheckpointManager(
            path / CHECKPOINT_DIR,
            item_names=ITEM_NAMES,
            options=ocp.CheckpointManagerOptions(read_only=True),
        ) as manager:
            step = best_step(manager)
        if step is None:
            raise FileNotFoundError(f"{path / CHECKPOINT_DIR}: no complete checkpoint")
        return path, path / CHECKPOINT_DIR / str(step)
    if (path / STATE_ITEM).is_dir() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent, path
    raise FileNotFoundError(
        f"{path}: neither a training workdir (with {CHECKPOINT_DIR}/) nor a complete "
        f"checkpoint step directory (with {STATE_ITEM}/)"
    )


def resolve_config_and_step(path: str | os.PathLike) -> tuple[ConfigDict, epath.Path]:
    """The run's config and the step directory `path` stands for (see `restore_inference`)."""
    workdir, step_dir = resolve(path)
    return read_config(workdir), step_dir


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)


def check_saved_shapes(step_dir: epath.Path, target: Any) -> None:
    """Raises AnotherModelError naming the first array of `target` that the step's state holds
    in another shape: the step was saved from another model than config.json describes.
    Read from the metadata, before any array is (Orbax's own error, after a partial read,
    says how to switch the check off and leaves threads failing at exit). Arrays the
    metadata lacks (a damaged step) are left for the restore to report."""
    # Orbax warns that a Composite item has no step metadata of its own (always so here), and
    # of a damaged step's unreadable metadata, which its restore reports.
    with _orbax_warnings_off(), ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(step_dir / STATE_ITEM)
    leaves = jax.tree_util.tree_flatten_with_path(getattr(metadata, "item_metadata", metadata))[0]
    saved = {_dotted(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = _dotted(path)
        if key in saved and saved[key] != tuple(leaf.shape):
            raise AnotherModelError(
                f"{step_dir}: saved from another model than "
                f"{step_dir.parent.parent / CONFIG_FILE} describes (array {key} has shape "
                f"{saved[key]}, that config makes {tuple(leaf.shape)})")


def restore_state(step_dir: str | os.PathLike, target: Any) -> Any:
    """The full `TrainState` of one step directory laid out as `target`, as `restore_train`
    takes it: sharded as in training."""
    step_dir = as_path(step_dir)
    check_saved_shapes(step_dir, target)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(step_dir / STATE_ITEM, target)


def restore_inference(path: str | os.PathLike) -> tuple[ConfigDict, Any, Any, int]:
    """Model arrays for inference: `(config, params, batch_stats, step)`.

    `path` is a training workdir, whose kept step with the best validation AUC is used (the
    latest when none was validated), or one step directory `WORKDIR/checkpoints/<step>`.
    Only params and batch_stats are read (no optimizer state), onto this process's first
    local device, as `nnx.State` pytrees shaped like `models.abstract_model`'s.
    Raises FileNotFoundError for a path without a complete checkpoint or config.json.
    """
    from cae_jax import models

    config, step_dir = resolve_config_and_step(path)
    _, params, batch_stats = models.abstract_model(config.model)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        {"params": params, "batch_stats": batch_stats},
    )
    check_saved_shapes(step_dir, target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            step_dir / STATE_ITEM,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    if not step_dir.name.isdigit():
        raise ValueError(f"{step_dir}: a step directory is named by its step number")
    step = int(step_dir.name)
    return config, restored["params"], restored["batch_stats"], step
