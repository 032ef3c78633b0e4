"""Compiled train and eval steps saved by `cae-jax compile --save-executable DIR` and loaded by
`cae-jax train --config.train.executable=DIR`, so a pod starts training without compiling.

DIR holds one serialized executable per step (`jax.experimental.serialize_executable`) and
`executable.json`, what they need to run: the jax, jaxlib and compiler plugin (libtpu, the
CUDA plugin) versions, the devices (platform, kind, count, slices), and a fingerprint of
each step's program (its StableHLO: the model, config constants such as the learning-rate
schedule, input shapes, dtypes, shardings and donation). The trainer lowers its own steps
(no compile) and loads the saved ones only where all of it matches; otherwise it warns once,
naming the first difference, and compiles as usual.

Loading runs code from DIR (the executables are pickles, as JAX's serializer writes them):
load only executables you compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from importlib import metadata
from typing import Any

import jax
from etils import epath
from jax.experimental import serialize_executable
from ml_collections import ConfigDict

from cae_jax import atomic_file, train_step

MANIFEST = "executable.json"
FORMAT = 1
# The compiler each platform's executables come from, besides jaxlib.
PLUGINS = {"tpu": ("libtpu",), "cuda": ("jax-cuda12-pjrt", "jax-cuda12-plugin"), "cpu": ()}


def versions(platform: str | None = None) -> dict[str, str]:
    """Installed versions of jax, jaxlib and the compiler plugins (of `platform`, else all)."""
    plugins = PLUGINS.get(platform, ()) if platform else sum(PLUGINS.values(), ())
    found = {}
    for package in ("jax", "jaxlib", *plugins):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def describe_devices(devices: list[jax.Device]) -> dict[str, Any]:
    """What an executable's device assignment needs of the devices it runs on."""
    return {"platform": devices[0].platform, "kind": devices[0].device_kind,
            "count": len(devices),
            "slices": len({getattr(d, "slice_index", 0) for d in devices})}


def devices_text(described: dict[str, Any]) -> str:
    slices = described["slices"]
    return (f"{described['count']} {described['kind']} devices"
            + (f" in {slices} slices" if slices > 1 else ""))


def fingerprint(lowered: jax.stages.Lowered) -> str:
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def step_file(name: str) -> str:
    return f"{name}_step.bin"


def save(directory: str | os.PathLike, devices: list[jax.Device],
         steps: dict[str, tuple[jax.stages.Lowered, jax.stages.Compiled]],
         target: str) -> None:
    """Writes DIR whole or not at all: the executables and their manifest, into a temporary
    directory renamed to DIR at the end."""
    directory = epath.Path(directory)
    tmp = atomic_file.temporary_path(directory)
    tmp.mkdir(parents=True)
    try:
        manifest = {"format": FORMAT, "target": target,
                    "versions": versions(devices[0].platform),
                    "devices": describe_devices(devices), "fingerprints": {}}
        for name, (lowered, compiled) in steps.items():
            payload, _, _ = serialize_executable.serialize(compiled)
            (tmp / step_file(name)).write_bytes(payload)
            manifest["fingerprints"][name] = fingerprint(lowered)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """DIR's manifest, its fields checked; a ValueError naming the file otherwise."""
    path = epath.Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"--config.train.executable={directory}: no {MANIFEST} there (a "
                         "directory written by `cae-jax compile --save-executable`)")
    try:
        manifest = json.loads(path.read_text())
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, this release reads {FORMAT}")
        return {"versions": {str(k): str(v) for k, v in manifest["versions"].items()},
                "devices": {k: manifest["devices"][k] for k in
                            ("platform", "kind", "count", "slices")},
                "fingerprints": {str(k): str(v) for k, v in manifest["fingerprints"].items()}}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: not written by cae-jax compile ({err})") from err


def target_mismatch(manifest: dict[str, Any], devices: list[jax.Device]) -> str | None:
    """Why the saved steps cannot run on `devices` with this install; None where they can."""
    here = describe_devices(devices)
    if manifest["devices"] != here:
        return (f"saved for {devices_text(manifest['devices'])}, running "
                f"{devices_text(here)}")
    current = versions(here["platform"])
    for package in sorted(manifest["versions"].keys() | current.keys()):
        saved, running = manifest["versions"].get(package), current.get(package)
        if saved != running:
            return f"saved for {package} {saved or '(none)'}, running {running or '(none)'}"
    return None


def program_mismatch(manifest: dict[str, Any], lowered: dict[str, jax.stages.Lowered]
                     ) -> str | None:
    """Which of this run's steps is not the saved program; None where all are."""
    for name, step in lowered.items():
        if manifest["fingerprints"].get(name) != fingerprint(step):
            return (f"saved for another program (this run's {name} step differs: its config "
                    "or input shapes)")
    return None


def load(directory: str | os.PathLike, config: ConfigDict, program: train_step.Program,
         devices: list[jax.Device]) -> train_step.Program | None:
    """`program` with its steps replaced by those saved in `directory`, where they match this
    run's versions, devices and program; else None, after one warning naming the first
    difference."""
    manifest = read_manifest(directory)
    mismatch = target_mismatch(manifest, devices)
    if not mismatch:  # Lowered (traced, not compiled) only where the target matches.
        lowered = train_step.lower_steps(config, program)
        mismatch = program_mismatch(manifest, lowered)
    if mismatch:
        logging.warning("--config.train.executable=%s: %s; compiling as usual.", directory,
                        mismatch)
        return None
    loaded = {name: serialize_executable.deserialize_and_load(
        (epath.Path(directory) / step_file(name)).read_bytes(), step.in_tree, step.out_tree,
        execution_devices=devices) for name, step in lowered.items()}
    return dataclasses.replace(program, train_step=loaded["train"], eval_step=loaded["eval"])
