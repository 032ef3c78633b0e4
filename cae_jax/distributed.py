"""Joining a multi-process JAX run (TPU pod hosts, SLURM nodes or GPUs, local processes).

`initialize_from_env()` must run before any JAX computation. It reads how this process was
launched from the environment and calls `jax.distributed.initialize` only when there is more
than one process, so the same command works on a laptop, a TPU pod and a GPU cluster.

Environment variables (all optional):
  CAE_JAX_DISTRIBUTED       "auto" (default) detects the launch below; "off" never initializes.
  CAE_JAX_COORDINATOR       host:port of process 0; set with the two below for an explicit launch
  CAE_JAX_NUM_PROCESSES     how many processes take part
  CAE_JAX_PROCESS_ID        this process, 0 .. NUM_PROCESSES-1
  CAE_JAX_LOCAL_DEVICE_IDS  comma list of the local accelerators this process drives
  CAE_JAX_INIT_TIMEOUT      seconds to wait for every process to join (default 300)

Without explicit variables "auto" recognizes, in this order: a SLURM step of more than one task
(`srun`; one process per node uses all the node's GPUs, several per node one GPU each), an Open
MPI launch of more than one rank, and a Cloud TPU VM (libtpu installed), where JAX reads the
pod's workers from the TPU metadata.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Mapping

import jax

from cae_jax import accelerators

ENV_MODE = "CAE_JAX_DISTRIBUTED"
ENV_COORDINATOR = "CAE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CAE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CAE_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "CAE_JAX_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "CAE_JAX_INIT_TIMEOUT"
EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
# What JAX reads to join a SLURM step; `srun` sets them all.
SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Arguments for `jax.distributed.initialize`; None fields are detected by JAX itself."""

    source: str  # "explicit", "slurm", "ompi" or "tpu".
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # None lets JAX choose; () keeps every local device (JAX restricts only a non-empty list).
    local_device_ids: tuple[int, ...] | None = None


def resolve_launch(
    environ: Mapping[str, str] | None = None, *, tpu_runtime: bool | None = None
) -> Launch | None:
    """How this process joins a multi-process run; None for a single-process run."""
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV_MODE, "auto")
    if mode not in ("auto", "off"):
        raise ValueError(f"{ENV_MODE} must be 'auto' or 'off', got {mode!r}")
    if mode == "off":
        return None
    if any(name in environ for name in EXPLICIT_VARS):
        return _explicit_launch(environ)
    if all(name in environ for name in SLURM_VARS) and _int_var(environ, "SLURM_NTASKS") > 1:
        return Launch("slurm", local_device_ids=() if _one_slurm_task_per_node(environ) else None)
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_var(environ, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return Launch("ompi")
    if tpu_runtime is None:
        tpu_runtime = importlib.util.find_spec("libtpu") is not None and accelerators.tpu_attached()
    if tpu_runtime:
        return Launch("tpu")
    return None


def initialize_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """Calls `jax.distributed.initialize` as the launch environment says (once per process)."""
    environ = os.environ if environ is None else environ
    launch = resolve_launch(environ)
    if launch is None or jax.distributed.is_initialized():
        return launch
    local_ids = launch.local_device_ids
    jax.distributed.initialize(
        coordinator_address=launch.coordinator_address,
        num_processes=launch.num_processes,
        process_id=launch.process_id,
        local_device_ids=None if local_ids is None else list(local_ids),
        initialization_timeout=_int_var(environ, ENV_INIT_TIMEOUT, 300),
    )
    logging.info(
        "Process %d of %d (%s launch), %d local of %d devices.",
        jax.process_index(),
        jax.process_count(),
        launch.source,
        jax.local_device_count(),
        jax.device_count(),
    )
    return launch


def _explicit_launch(environ: Mapping[str, str]) -> Launch | None:
    missing = [name for name in EXPLICIT_VARS if name not in environ]
    if missing:
        raise ValueError(
            f"explicit multi-process launch needs {', '.join(EXPLICIT_VARS)}; "
            f"missing {', '.join(missing)}"
        )
    coordinator = environ[ENV_COORDINATOR]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_COORDINATOR} must be host:port, got {coordinator!r}")
    num_processes = _int_var(environ, ENV_NUM_PROCESSES)
    process_id = _int_var(environ, ENV_PROCESS_ID)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}={num_processes})"
        )
    if num_processes == 1:
        return None
    local_ids = environ.get(ENV_LOCAL_DEVICE_IDS, "").strip()
    try:
        ids = tuple(int(i) for i in local_ids.split(",")) if local_ids else None
    except ValueError as err:
        raise ValueError(
            f"{ENV_LOCAL_DEVICE_IDS} must be a comma list of ints, got {local_ids!r}"
        ) from err
    return Launch("explicit", coordinator, num_processes, process_id, ids)


def _one_slurm_task_per_node(environ: Mapping[str, str]) -> bool:
    tasks = environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])
    nodes = environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "0"))
    return tasks == nodes


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(text)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from err
