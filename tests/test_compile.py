"""`cae-jax compile`: the tiny config's train and eval steps compiled by XLA's TPU and GPU
compilers on this CPU-only host (compile-only devices), with fit, cost and collectives; an
oversized batch is a result, not a traceback; --max-batch finds the boundary."""

import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
from importlib import metadata

import jax
import pytest

from cae_jax import (
    accelerators,
    aot_compile,
    compile_table,
    main,
    saved_executable,
    sharding,
    train_step,
)
from cae_jax import config as config_lib

needs_libtpu = pytest.mark.skipif(not importlib.util.find_spec("libtpu"),
                                  reason="the tpu-compile extra (libtpu) is not installed")
needs_cuda_plugin = pytest.mark.skipif(  # find_spec of a.b raises where a is absent.
    not (importlib.util.find_spec("jax_plugins")
         and importlib.util.find_spec("jax_plugins.xla_cuda12")),
    reason="the cuda-compile extra (jax-cuda12-pjrt) is not installed")
# Augmentation on the host: the same model, a quicker compile.
FAST = ["--config.input.augment.on_device=off"]


def tiny(**fields):
    config = config_lib.load_config("configs/tiny.py", [f"--config.{k}={v}" for k, v in
                                                         fields.items()] + FAST)
    return config


def test_topology_names_map_to_slices_and_unknown_ones_are_refused():
    assert accelerators.parse("v5litepod-16").topology == "v5e:4x4"
    assert accelerators.parse("v5p-128").topology == "v5:4x4x4"  # 64 chips: cores in the name
    assert accelerators.parse("v4-32").topology == "v4:2x2x4"
    assert accelerators.parse("v6e-256").topology == "v6e:16x16"
    assert accelerators.parse("tpu7x-8").devices == 8  # 4 chips, 2 devices each
    assert accelerators.parse("h100-8", slices=2).topology == "1x2x8"
    with pytest.raises(ValueError, match=r"--topology 'v9-4': unknown accelerator; known: v4-N"):
        accelerators.parse("v9-4")


def test_unknown_topology_or_a_taken_executable_dir_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --topology 'k80-8': unknown accelerator"):
        main.main(["compile", "--topology", "k80-8", "--config", "configs/tiny.py"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match=rf"^error: --save-executable {tmp_path / 'taken'}: "
                       "exists; name a new directory$"):
        main.main(["compile", "--topology", "v5litepod-4", "--config", "configs/tiny.py",
                   "--save-executable", str(tmp_path / "taken")])


@needs_libtpu
def test_tiny_train_and_eval_steps_compile_for_v5e_2x2(tmp_path, capsys, caplog, request):
    saved = tmp_path / "v5e-executable"
    # --save-executable turns the persistent compilation cache off for its process.
    cache = jax.config.jax_enable_compilation_cache
    request.addfinalizer(lambda: jax.config.update("jax_enable_compilation_cache", cache))
    main.main(["compile", "--topology", "v5litepod-4", "--config", "configs/tiny.py",
               "--batch-per-chip", "8", "--out", str(tmp_path), "--save-executable",
               str(saved), *FAST])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["target"]["topology"] == "v5e:2x2" and report["global_batch"] == 32
    train = report["steps"]["train step"]
    assert train["fits"] and report["steps"]["eval step"]["fits"]
    for name in ("arguments", "outputs", "temporaries", "total"):
        assert train["memory"][name] > 0
    assert train["cost"]["flops"] > 0 and train["roofline"]["images_per_second_per_chip"] > 0
    # Global-batch BatchNorm and the gradient all-reduce: data parallel over 4 chips.
    assert train["collectives"]["all-reduce"]["count"] > 0
    assert "| fits | yes," in (tmp_path / "report.md").read_text()
    assert "does not fit" not in capsys.readouterr().out
    # The report `cae-jax compile-table` reads.
    row = compile_table.row(compile_table.read_report(tmp_path / "report.json"))
    assert (row["chips"], row["batchnorm"], row["fits"]) == (4, "global batch", True)
    assert row["hbm_gib"] == train["memory"]["total"] / 2**30
    # The executables compiled for the v5e slice are saved here, and refused, by their
    # devices, by a trainer on this host's CPUs (which then compiles its own).
    manifest = json.loads((saved / "executable.json").read_text())
    assert manifest["devices"] == {"platform": "tpu", "kind": "TPU v5 lite", "count": 4,
                                   "slices": 1}
    assert manifest["versions"]["libtpu"] == metadata.version("libtpu")
    assert (saved / "train_step.bin").stat().st_size > 0
    config = tiny(**{"train.batch_size": 32})
    program = train_step.build_program(config, jax.devices())
    with caplog.at_level(logging.WARNING):
        assert saved_executable.load(saved, config, program, jax.devices()) is None
    assert caplog.records[-1].getMessage() == (
        f"--config.train.executable={saved}: saved for 4 TPU v5 lite devices, running 8 cpu "
        "devices; compiling as usual.")


@needs_libtpu
def test_an_oversized_batch_is_reported_as_not_fitting_with_xlas_message():
    target = accelerators.parse("v5litepod-4")
    devices = accelerators.compile_only_devices(target)
    steps = aot_compile.compile_program(tiny(), target, devices, 2**16, steps=("train",),
                                        analyze=False)
    assert not steps["train step"]["fits"]
    assert "memory" in steps["train step"]["message"].lower()


@pytest.fixture(scope="module")
def h100_at_1():
    """The train step for one H100 at 1 per chip: (target, devices, config, its result).
    At 60 the decoder's 64 is resized: jax.image's HIGHEST-precision matmul did not compile
    for the GPU with XLA's default flags, the model's resize does."""
    target = accelerators.parse("h100-1")
    devices = accelerators.compile_only_devices(target)
    config = tiny(**{"model.image_size": 60})
    step = aot_compile.compile_program(config, target, devices, 1,
                                       steps=("train",))["train step"]
    return target, devices, config, step


@needs_libtpu
def test_on_a_tpu_the_compiler_decides_the_fit_not_the_published_hbm():
    """XLA's TPU compiler refuses what exceeds the HBM it leaves programs; the published
    figure (here made 1 byte) is for the margin only, never a second verdict."""
    target = accelerators.parse("v5litepod-4")
    target = dataclasses.replace(target, chip=dataclasses.replace(target.chip, hbm_bytes=1))
    devices = accelerators.compile_only_devices(target)
    steps = aot_compile.compile_program(tiny(), target, devices, 8, steps=("train",),
                                        analyze=False)
    assert steps["train step"]["fits"] and "message" not in steps["train step"]


@needs_cuda_plugin
def test_tiny_train_step_compiles_for_one_h100_with_default_flags(h100_at_1):
    step = h100_at_1[3]
    assert step["fits"] and step["memory"]["total"] > 0
    assert step["cost"]["flops"] > 0 and step["collectives"] == {}


def test_bisection_finds_the_boundary_in_the_fewest_compiles_with_the_first_failures_message():
    """Doubling from 8 to the first that does not fit (64), then bisecting in steps of 2
    (tpu7x: two devices per chip); the start's compile is reused, not repeated."""
    tried = []

    def fits(batch):
        tried.append(batch)
        return {"fits": batch <= 37, "message": f"{batch} does not fit"}

    found = aot_compile.largest_fitting(fits, 8, 2, at_start={"fits": True})
    assert (found["fits"], found["fails"], found["message"]) == (36, 38, "38 does not fit")
    assert tried == [16, 32, 64, 48, 40, 36, 38]
    assert aot_compile.largest_fitting(fits, 64, 1) == {"fits": 37, "fails": 38,
                                                        "message": "38 does not fit"}
    assert aot_compile.largest_fitting(lambda batch: {"fits": True}, 2**15, 1)["fails"] is None


@needs_cuda_plugin
def test_max_batch_finds_the_largest_batch_that_fits(h100_at_1):
    """On a GPU the fit is this report's own comparison, so a GPU made as small as the train
    step at 1 per chip puts the boundary where one more compile finds it: the report's own
    compile at 1 (reused) fits, 2 does not."""
    target, devices, config, at_1 = h100_at_1
    target = dataclasses.replace(
        target, chip=dataclasses.replace(target.chip, hbm_bytes=at_1["memory"]["total"]))
    found = aot_compile.max_batch(config, target, devices, start=1, at_start=at_1)
    assert (found["fits"], found["fails"]) == (1, 2)
    assert "exceed the" in found["message"]


@needs_libtpu
def test_two_slices_put_the_dcn_outermost_on_the_data_axis():
    """`--slices 2` (multislice): the data axis runs over slice 0's devices, then slice 1's,
    so only the data axis crosses the data-center network."""
    target = accelerators.parse("v5litepod-4", slices=2)
    config = aot_compile.configured(tiny(), target, batch_per_chip=8)
    assert config.mesh.slices == 2 and config.train.batch_size == 64
    aot_compile.quiet_libtpu(target)
    mesh = sharding.make_mesh(-1, 1, accelerators.compile_only_devices(target), 2)
    assert [d.slice_index for d in mesh.devices[:, 0]] == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="mesh.slices=3 must divide mesh data=8"):
        sharding.make_mesh(-1, 1, mesh.devices.ravel(), 3)


def test_hosts_without_a_tpu_or_gpu_pick_the_cpu_and_others_are_left_alone(tmp_path,
                                                                          monkeypatch):
    """With libtpu installed JAX would probe for a TPU and warn in every CPU command."""
    none = (str(tmp_path / "accel[0-9]*"),)
    monkeypatch.setattr(accelerators, "TPU_DEVICE_FILES", none)
    monkeypatch.setattr(accelerators, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia[0-9]*"),))
    environ = {}
    accelerators.use_cpu_where_nothing_is_attached(environ)
    assert environ == {"JAX_PLATFORMS": "cpu"}
    environ = {"JAX_PLATFORMS": "tpu"}
    accelerators.use_cpu_where_nothing_is_attached(environ)
    assert environ == {"JAX_PLATFORMS": "tpu"}  # The user's choice stands.
    (tmp_path / "accel0").touch()  # A TPU host: JAX finds its TPU as usual.
    environ = {}
    accelerators.use_cpu_where_nothing_is_attached(environ)
    assert environ == {}


@needs_libtpu
def test_compiles_run_beside_a_process_holding_libtpus_lock():
    """libtpu's lockfile lets one process own a TPU; a compile owns none, so a second compile
    on the host (a sweep's rows, a test beside a sweep) must not be refused by it."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    holder = subprocess.Popen(
        [sys.executable, "-c", "from jax.experimental import topologies; "
         "topologies.get_topology_desc('v5e:2x2', platform='tpu'); print('held', flush=True); "
         "import time; time.sleep(120)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        plain = subprocess.run(
            [sys.executable, "-c", "from jax.experimental import topologies; "
             "topologies.get_topology_desc('v5e:2x2', platform='tpu')"],
            env=env, capture_output=True, text=True)
        assert plain.returncode != 0 and "lockfile" in plain.stderr  # The lock is held.
        ours = subprocess.run(
            [sys.executable, "-c", "from cae_jax import accelerators; print(len("
             "accelerators.compile_only_devices(accelerators.parse('v5litepod-4'))))"],
            env=env, capture_output=True, text=True)
        assert ours.returncode == 0 and ours.stdout == "4\n", ours.stderr
    finally:
        holder.kill()
        holder.wait()
