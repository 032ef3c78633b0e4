"""`cae-jax compile --topology v5p-128 --config FILE [--config.a.b=v ...]`: the real train and
eval steps compiled for a TPU slice or GPU host on this machine, no accelerator needed.

The program is the trainer's own (`train_step.build_program`: the same mesh, abstract state,
shardings, donation and on-device augmentation), compiled by XLA's TPU compiler (libtpu, the
`tpu-compile` extra) or GPU compiler (the `cuda-compile` extra) for the target's devices. The
report: HBM per device and whether it fits, FLOPs and bytes, a roofline estimate of images/s,
the collectives per step, compile times (`compile_report.py`). A program that does not fit is
a result: "does not fit" with XLA's message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
from ml_collections import ConfigDict

from cae_jax import accelerators, compile_report, saved_executable, train_step
from cae_jax import config as config_lib

ACCEPTS_CONFIG_OVERRIDES = True
MAX_BATCH_LIMIT = 2**16  # per chip: --max-batch stops doubling here.


class OutOfMemory(Exception):
    """XLA refused the program for the device's memory (or, on GPU, it exceeds it)."""


def phase(message: str) -> None:
    print(f"cae-jax compile: {message}", file=sys.stderr, flush=True)


def quiet_libtpu(target: accelerators.Target) -> None:
    """libtpu warns on every load that it finds no TPU host; on a host without one, tell it
    which slice it compiles for and that there is no metadata server to ask."""
    if target.chip.platform == "tpu" and not accelerators.attached():
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def xla_message(err: Exception) -> str:
    """XLA's out-of-memory sentence(s), without its source-location trail."""
    text = str(err).split("\n\n")[0].strip()
    return " ".join(text.split())[:600]


def is_out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def compile_step(name: str, lowered: jax.stages.Lowered, start: float,
                 target: accelerators.Target, batch_per_chip: int, *, analyze: bool = True
                 ) -> tuple[dict, jax.stages.Compiled | None]:
    """One step compiled: fits or not, and (with `analyze`) its memory, cost and collectives;
    with the executable where XLA made one. Its time counts from `start` (before lowering)."""
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if not is_out_of_memory(err):
            raise
        seconds = time.perf_counter() - start
        phase(f"{name}: does not fit ({seconds:.1f} s)")
        return {"fits": False, "message": xla_message(err), "compile_seconds": seconds}, None
    seconds = time.perf_counter() - start
    chip = target.chip
    hbm = chip.hbm_bytes // chip.devices_per_chip
    memory = compile_report.memory(compiled)
    # XLA's TPU compiler refuses a program larger than the HBM it leaves programs (the
    # except above); its GPU compiler does not, so a GPU program is compared here.
    fits = chip.platform != "cuda" or memory["total"] <= hbm
    step = {"fits": fits, "memory": memory, "hbm_per_device": hbm, "compile_seconds": seconds}
    if not fits:
        step["message"] = (f"{compile_report.gib(memory['total'])} per device exceed the "
                           f"{compile_report.gib(hbm)} of one {target.name.split('-')[0]} "
                           "(checked here: XLA's GPU compiler does not refuse it)")
    phase(f"{name}: {compile_report.gib(memory['total'])} per device, "
          f"{'fits' if step['fits'] else 'does not fit'} ({seconds:.1f} s)")
    if analyze:
        cost = compile_report.cost(compiled, lowered, target.devices)
        per_device_batch = batch_per_chip / chip.devices_per_chip
        step.update(
            cost=cost, flops_per_image=cost["flops"] / per_device_batch,
            roofline=compile_report.roofline(cost["flops"], cost["bytes"], chip, batch_per_chip,
                                             target.chips * target.slices),
            collectives=compile_report.collectives(compiled.as_text()))
    if target.chip.platform == "cuda":
        step["note"] = "cuDNN's workspace is not counted"
    return step, compiled


def configured(config: ConfigDict, target: accelerators.Target, batch_per_chip: int
               ) -> ConfigDict:
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch_per_chip * target.chips * target.slices
    if target.chip.platform == "tpu":
        config.mesh.slices = target.slices
    return config


def compile_program(config: ConfigDict, target: accelerators.Target,
                    devices: list[jax.Device], batch_per_chip: int, *, steps=("train", "eval"),
                    analyze: bool = True, save_to: str | None = None) -> dict[str, dict]:
    """The trainer's train and eval steps for `target`, compiled at `batch_per_chip`; with
    `save_to`, their executables saved there for `cae-jax train` where both fit."""
    config = configured(config, target, batch_per_chip)
    program = train_step.build_program(config, devices)
    results, executables = {}, {}
    for name in steps:
        start = time.perf_counter()
        lowered = train_step.lower_steps(config, program, (name,))[name]
        results[f"{name} step"], compiled = compile_step(f"{name} step", lowered, start,
                                                         target, batch_per_chip,
                                                         analyze=analyze)
        executables[name] = lowered, compiled
    if save_to:
        unfit = [name for name, result in results.items() if not result["fits"]]
        if unfit:
            phase(f"not saved: the {unfit[0]} does not fit")
        else:
            saved_executable.save(save_to, devices, executables, target.name)
            phase(f"saved the compiled steps to {save_to}")
    return results


def max_batch(config: ConfigDict, target: accelerators.Target, devices: list[jax.Device],
              start: int, at_start: dict | None = None) -> dict:
    """The largest per-chip batch whose train step fits, by compiling (`largest_fitting`);
    `at_start` is the train step already compiled at `start`, where there is one."""

    def fits(batch: int) -> dict:
        phase(f"--max-batch: trying {batch} per chip")
        return compile_program(config, target, devices, batch, steps=("train",),
                               analyze=False)["train step"]

    return largest_fitting(fits, start, target.chip.devices_per_chip, at_start)


def largest_fitting(fits: Callable[[int], dict], start: int, unit: int,
                    at_start: dict | None = None) -> dict:
    """The largest multiple of `unit` whose `fits(batch)["fits"]`: doubling from `start` until
    one does not fit, then bisecting; with the message of the smallest that does not."""
    low, high, failure = 0, max(start, unit), None
    while high <= MAX_BATCH_LIMIT:
        result = at_start if at_start is not None and high == start else fits(high)
        if not result["fits"]:
            failure = result
            break
        low, high = high, high * 2
    if failure is None:
        return {"fits": low, "fails": None, "message": f"fits up to {MAX_BATCH_LIMIT}"}
    while high - low > unit:
        middle = (low + high) // 2 // unit * unit
        result = fits(middle)
        if result["fits"]:
            low = middle
        else:
            high, failure = middle, result
    return {"fits": low, "fails": high, "message": failure["message"]}


def report(config: ConfigDict, target: accelerators.Target, batch_per_chip: int | None,
           find_max_batch: bool = False, save_to: str | None = None) -> dict:
    quiet_libtpu(target)
    start = time.perf_counter()
    devices = accelerators.compile_only_devices(target)
    phase(f"{len(devices)} compile-only devices of {target.topology} "
          f"({time.perf_counter() - start:.1f} s)")
    if batch_per_chip is None:
        batch_per_chip = max(config.train.batch_size // (target.chips * target.slices), 1)
    result = {
        "target": {"name": target.name, "topology": target.topology, "chips": target.chips,
                   "slices": target.slices, "devices": target.devices,
                   "platform": target.chip.platform},
        "chip": {"hbm_bytes": target.chip.hbm_bytes,
                 "bf16_tflops": target.chip.bf16_flops / 1e12,
                 "hbm_gb_per_second": target.chip.hbm_bytes_per_second / 1e9,
                 "source": target.chip.source},
        "batch_per_chip": batch_per_chip,
        "global_batch": batch_per_chip * target.chips * target.slices,
        "dtype": config.model.dtype,
        "bn_group": config.model.bn_group,
        "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp},
        "versions": saved_executable.versions(),
        "estimated": ["roofline", "images_per_second_per_chip", "images_per_second_total"],
        "steps": compile_program(config, target, devices, batch_per_chip, save_to=save_to),
    }
    if find_max_batch:
        result["max_batch"] = max_batch(config, target, devices, batch_per_chip,
                                        result["steps"]["train step"])
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True,
                        help=f"accelerator type: {accelerators.known_names()}")
    parser.add_argument("--slices", type=int, default=1,
                        help="TPU slices (multislice over DCN), or GPU hosts")
    parser.add_argument("--config", required=True, help="config file defining get_config()")
    parser.add_argument("--batch-per-chip", type=int, default=None,
                        help="default: the config's train.batch_size over the chips")
    parser.add_argument("--max-batch", action="store_true",
                        help="also find the largest batch per chip that fits, by compiling")
    parser.add_argument("--save-executable", default=None, metavar="DIR",
                        help="a new directory for the compiled train and eval steps, which "
                        "`cae-jax train --config.train.executable=DIR` loads on a matching "
                        "pod instead of compiling")
    parser.add_argument("--out", default=None,
                        help="directory for report.json and report.md (default: print only)")
    parser.epilog = "Config fields are overridden with --config.a.b=value (repeatable)."


def run(args: argparse.Namespace) -> int:
    try:
        target = accelerators.parse(args.topology, args.slices)
        config = config_lib.load_config(args.config, args.overrides)
        config_lib.validate(config)
        if args.batch_per_chip is not None and (
                args.batch_per_chip < 1 or args.batch_per_chip % target.chip.devices_per_chip):
            raise ValueError(f"--batch-per-chip {args.batch_per_chip}: must be a positive "
                             f"multiple of {target.chip.devices_per_chip}")
        if args.save_executable and os.path.lexists(args.save_executable):
            raise ValueError(f"--save-executable {args.save_executable}: exists; name a new "
                             "directory")
        if args.save_executable:  # Before the first compile, which fixes the choice.
            # Executables read back from the persistent compilation cache can serialize
            # incompletely (XLA:CPU's lose kernels): the saved ones are compiled afresh.
            jax.config.update("jax_enable_compilation_cache", False)
        result = report(config, target, args.batch_per_chip, args.max_batch,
                        args.save_executable)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    text = compile_report.markdown(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(text)
    print(text, end="")
    return 0
