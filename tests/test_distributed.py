"""Multi-process runs: launch detection, and 2 CPU processes training and evaluating like 1."""

import importlib.util

import pytest

from cae_jax import accelerators, distributed
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


# ---- 2 processes vs 1 ---------------------------------------------------------------------
# One process with 2 CPU devices and 2 processes with 1 device each (joined through the
# CAE_JAX_* variables, gloo collectives) train the same tiny model on the same global batches in
# a (data=1, fsdp=2) mesh, so the batch and the larger kernels are split across the processes.
# Every reduction has two operands either way, so the results must agree to float rounding.
# Both score the same validation split (11 records: 6 on one host, 5 on the other, padded),
# which every host must see whole. Each run then resumes, as the trainer does
# (`checkpoints.restore_train`), from its own checkpoint and from the other's: across process
# counts the state moves and the data restarts. The processes execute this file as a script
# (`worker` below).

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
TIMEOUT = 600  # Seconds for the whole exchange; a hung collective fails instead of hanging.


def tiny_config():
    from cae_jax import config as config_lib

    config = config_lib.default_config()
    m = config.model
    m.image_size = 32
    m.layer_impl = "native"
    m.encoder.stem_features = (8, 16)
    m.encoder.entry_features = (16,)
    m.encoder.middle_blocks = 0
    m.encoder.exit_features = (32, 64)
    m.encoder.head_features = (128, 256)  # Big enough that some kernels are FSDP-sharded.
    m.decoder.features = (32, 16)
    m.classifier.hidden = (16,)
    config.mesh.data, config.mesh.fsdp = 1, 2
    config.train.batch_size = GLOBAL_BATCH
    config.train.steps = STEPS
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 1
    return config


def global_batch(step: int) -> dict[str, np.ndarray]:
    """The same global batch in every process, a different one at each step."""
    rng = np.random.default_rng(step)
    images = rng.integers(0, 256, (GLOBAL_BATCH, 32, 32, 3), dtype=np.uint8)
    return {"image": images, "label": np.arange(GLOBAL_BATCH, dtype=np.int32) % 2}


def process_rows(batch_sharding, global_shape) -> slice:
    """The rows of the global batch held by this process's devices (one contiguous block)."""
    indices = batch_sharding.addressable_devices_indices_map(global_shape).values()
    rows = [index[0] for index in indices]
    start, stop = min(r.start for r in rows), max(r.stop for r in rows)
    assert sum(r.stop - r.start for r in rows) == stop - start
    return slice(start, stop)


def save_npz(tree, path: Path, mesh) -> None:
    """Every array of `tree`, gathered from all processes in one program; process 0 writes."""
    import jax

    from cae_jax import sharding

    gathered = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))(tree)
    if jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(gathered)[0]
        arrays = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in flat}
        np.savez(path, **arrays)


def wait_for(path: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.5)


def worker(out_dir: Path, peer_dir: Path, data_dir: str) -> None:
    """One process of a run: train, evaluate, checkpoint, then resume from both checkpoints."""
    import grain
    import jax
    from jax.experimental import multihost_utils

    from cae_jax import checkpoints, distributed, evaluate, sharding
    from cae_jax import train_step as train_lib

    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    started = time.time()
    log = lambda event: print(f"{time.time() - started:6.1f}s {event}", flush=True)  # noqa: E731
    distributed.initialize_from_env()
    log(f"process {jax.process_index()} of {jax.process_count()}")
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    abstract = train_lib.abstract_state(config, mesh)
    state = train_lib.create_train_state(config, abstract)
    train_step = train_lib.make_train_step(config, abstract)
    save_npz(state, out_dir / "initial.npz", mesh)
    log("initialized")
    batch_sharding = sharding.batch_sharding(mesh)
    for step in range(STEPS):
        host_batch = global_batch(step)
        rows = process_rows(batch_sharding, host_batch["image"].shape)
        batch = {
            key: jax.make_array_from_process_local_data(batch_sharding, value[rows], value.shape)
            for key, value in host_batch.items()
        }
        state, _ = train_step(state, batch)
        log(f"step {step}")
    save_npz(state, out_dir / "trained.npz", mesh)
    scores = evaluate.score_split(config, train_lib.make_eval_step(config, abstract), state, mesh,
                                  data_dir, "validation", progress=False)
    np.savez(out_dir / f"scores{jax.process_index()}.npz",
             **{k: v.astype(str) if v.dtype == object else v for k, v in scores.items()})
    log("evaluated")
    new_data = lambda: iter(grain.MapDataset.range(100).to_iter_dataset())  # noqa: E731
    data = new_data()
    for _ in range(STEPS):
        next(data)
    with checkpoints.make_manager(out_dir, config) as manager:
        checkpoints.save(manager, STEPS, state, data)
        manager.wait_until_finished()
    multihost_utils.sync_global_devices("saved")
    if jax.process_index() == 0:
        info = {"processes": jax.process_count(), "local_devices": jax.local_device_count()}
        (out_dir / "saved.json").write_text(json.dumps(info))
    log("saved")
    wait_for(peer_dir / "saved.json")
    next_items = {}
    for name, workdir in [("own", out_dir), ("peer", peer_dir)]:
        data = new_data()
        with checkpoints.make_manager(workdir, config) as manager:
            restored = checkpoints.restore_train(manager, STEPS, abstract.shapes, data)
        save_npz(restored, out_dir / f"restored_{name}.npz", mesh)
        next_items[name] = int(next(data))
    if jax.process_index() == 0:
        (out_dir / "next_items.json").write_text(json.dumps(next_items))
    log("restored")


def spawn(out_dir: Path, peer_dir: Path, data_dir: Path, devices: int, launch: dict[str, str]):
    out_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAE_JAX")}
    # The device count is the process's own; conftest's compile flags stay.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               **launch)
    log = open(out_dir / f"log{launch.get('CAE_JAX_PROCESS_ID', '')}.txt", "w")
    command = [sys.executable, __file__, str(out_dir), str(peer_dir), str(data_dir)]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_evaluate_like_one_and_share_checkpoints(tmp_path):
    from tests import datasets

    data_dir = datasets.write(tmp_path / "data", {"validation": (5, 6)}, size=32, num_shards=2)
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    coordinator = f"127.0.0.1:{free_port()}"
    runs = [spawn(one, two, data_dir, devices=2, launch={})]
    for i in range(2):
        launch = {
            "CAE_JAX_COORDINATOR": coordinator,
            "CAE_JAX_NUM_PROCESSES": "2",
            "CAE_JAX_PROCESS_ID": str(i),
        }
        runs.append(spawn(two, one, data_dir, devices=1, launch=launch))
    deadline = time.time() + TIMEOUT
    try:
        for process, log in runs:
            process.wait(timeout=max(1.0, deadline - time.time()))
            log.close()
    finally:
        for process, _ in runs:
            process.kill()
    for process, log in runs:
        assert process.returncode == 0, Path(log.name).read_text()[-3000:]

    assert json.loads((two / "saved.json").read_text()) == {"processes": 2, "local_devices": 1}
    assert json.loads((one / "saved.json").read_text()) == {"processes": 1, "local_devices": 2}
    initial, single, multi = (
        np.load(p) for p in [one / "initial.npz", one / "trained.npz", two / "trained.npz"]
    )
    assert sorted(single.files) == sorted(multi.files)
    # Training moved the parameters far more than the tolerance the runs must agree to.
    assert max(np.abs(single[k] - initial[k]).max() for k in single.files) > 1e-3
    for key in single.files:
        np.testing.assert_allclose(multi[key], single[key], rtol=0, atol=1e-5, err_msg=key)
    # Every host scores the whole split, in record order, as one process does.
    expected = np.load(one / "scores0.npz")
    np.testing.assert_array_equal(np.sort(expected["frame_index"]), np.arange(11))
    for scores in [np.load(two / "scores0.npz"), np.load(two / "scores1.npz")]:
        assert sorted(scores.files) == sorted(expected.files)
        for key in expected.files:
            if expected[key].dtype.kind in "iU":
                np.testing.assert_array_equal(scores[key], expected[key], err_msg=key)
            else:
                np.testing.assert_allclose(scores[key], expected[key], atol=1e-5, err_msg=key)
    # Resuming moves the state unchanged; the data position only within one process count.
    for run, own_run, peer_run in [(one, single, multi), (two, multi, single)]:
        for name, saved in [("own", own_run), ("peer", peer_run)]:
            restored = np.load(run / f"restored_{name}.npz")
            for key in saved.files:
                np.testing.assert_array_equal(restored[key], saved[key], err_msg=key)
        assert json.loads((run / "next_items.json").read_text()) == {"own": STEPS, "peer": 0}
    assert "no data position for 2 processes" in (two / "log0.txt").read_text()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])


@pytest.mark.skipif(not importlib.util.find_spec("libtpu"), reason="libtpu not installed")
def test_libtpu_on_a_host_without_a_tpu_is_a_single_process_run(tmp_path, monkeypatch):
    """The tpu-compile extra installs libtpu on CPU hosts: no TPU launch there."""
    monkeypatch.setattr(accelerators, "TPU_DEVICE_FILES", (str(tmp_path / "accel[0-9]*"),))
    assert resolve_launch({}) is None
    (tmp_path / "accel0").touch()
    assert resolve_launch({}) == Launch("tpu")
