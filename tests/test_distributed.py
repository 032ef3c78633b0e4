"""Multi-process runs: launch detection, and 2 CPU processes training like 1 (checkpoints too)."""

import pytest

from cae_jax import distributed
from cae_jax.distributed import Launch, resolve_launch

EXPLICIT = {
    "CAE_JAX_COORDINATOR": "10.0.0.2:8476",
    "CAE_JAX_NUM_PROCESSES": "4",
    "CAE_JAX_PROCESS_ID": "3",
}
SLURM_STEP = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
}


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"PATH": "/bin", "SLURM_JOB_ID": "77"}, None),  # sbatch's batch shell, not an srun step
        (EXPLICIT, Launch("explicit", "10.0.0.2:8476", 4, 3, None)),
        (
            {**EXPLICIT, "CAE_JAX_LOCAL_DEVICE_IDS": "2,3"},
            Launch("explicit", "10.0.0.2:8476", 4, 3, (2, 3)),
        ),
        ({**EXPLICIT, "CAE_JAX_NUM_PROCESSES": "1", "CAE_JAX_PROCESS_ID": "0"}, None),
        ({**EXPLICIT, "CAE_JAX_DISTRIBUTED": "off"}, None),
        # One task per GPU: JAX gives each task the GPU of its SLURM_LOCALID.
        (
            {
                **SLURM_STEP,
                "SLURM_NTASKS": "16",
                "SLURM_STEP_NUM_TASKS": "16",
                "SLURM_STEP_NUM_NODES": "2",
            },
            Launch("slurm", local_device_ids=None),
        ),
        # One task per node: every GPU of the node stays visible.
        (
            {
                **SLURM_STEP,
                "SLURM_NTASKS": "2",
                "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_STEP_NUM_NODES": "2",
            },
            Launch("slurm", local_device_ids=()),
        ),
        ({**SLURM_STEP, "SLURM_NTASKS": "1"}, None),
        # Explicit variables win over the scheduler's.
        (
            {**SLURM_STEP, "SLURM_NTASKS": "16", **EXPLICIT},
            Launch("explicit", "10.0.0.2:8476", 4, 3),
        ),
        (
            {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "8"},
            Launch("ompi"),
        ),
    ],
)
def test_resolve_launch(environ, expected):
    assert resolve_launch(environ, tpu_runtime=False) == expected


def test_tpu_vm_lets_jax_read_the_pod_from_metadata():
    assert resolve_launch({}, tpu_runtime=True) == Launch("tpu")
    assert resolve_launch({"CAE_JAX_DISTRIBUTED": "off"}, tpu_runtime=True) is None


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"CAE_JAX_COORDINATOR": "h:1"}, "missing CAE_JAX_NUM_PROCESSES, CAE_JAX_PROCESS_ID"),
        ({**EXPLICIT, "CAE_JAX_COORDINATOR": "no-port"}, "must be host:port, got 'no-port'"),
        ({**EXPLICIT, "CAE_JAX_PROCESS_ID": "4"}, r"CAE_JAX_PROCESS_ID=4 must lie in \[0, "),
        ({**EXPLICIT, "CAE_JAX_NUM_PROCESSES": "two"}, "CAE_JAX_NUM_PROCESSES must be an integer"),
        ({**EXPLICIT, "CAE_JAX_LOCAL_DEVICE_IDS": "0;1"}, "comma list of ints, got '0;1'"),
        ({"CAE_JAX_DISTRIBUTED": "yes"}, "must be 'auto' or 'off'"),
    ],
)
def test_bad_launch_variables_are_named(environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_launch(environ, tpu_runtime=False)


def test_single_process_initialize_leaves_jax_alone():
    assert distributed.initialize_from_env({"CAE_JAX_DISTRIBUTED": "off"}) is None
    import jax

    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
