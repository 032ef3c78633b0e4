"""The accelerators `cae-jax compile` targets: one table of chips, and their compile-only devices.

Users name a target as they book it: Cloud TPU accelerator types (`v4-32`, `v5litepod-16`,
`v5p-128`, `v6e-256`, `tpu7x-8`) and GPUs per host (`h100-8`, `h200-8`, `a100-8`). TPU v4, v5p
and tpu7x count TensorCores in the name (two per chip), v5e and v6e count chips. The topology
is laid out as Google lays out its slices: v5e/v6e on a 2-D grid, v4/v5p/tpu7x on a 3-D torus
(MaxText's `accelerator_to_spec_map.py` lists the same shapes).

The chips' HBM, bf16 peak and HBM bandwidth are the vendors' published figures (`SOURCES`):
the roofline in `compile_report.py` is estimated from them, never measured.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # JAX is imported where devices are made: `cae-jax` imports this at start.
    import jax

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip as the compiler and the roofline see it."""

    platform: str  # "tpu" or "cuda"
    generation: str  # libtpu's topology prefix ("v5e", "v5"), or the GPU spec file's stem.
    hbm_bytes: int  # per chip
    bf16_flops: float  # dense peak per chip, FLOP/s
    hbm_bytes_per_second: float
    chips_per_host: int
    devices_per_chip: int = 1  # JAX devices per chip (tpu7x: one per TensorCore)
    cores_in_name: int = 1  # what the accelerator type's number counts per chip
    grid_dims: int = 2  # TPU slice shape: 2-D grid or 3-D torus
    chip_config: str = "default"  # libtpu's chip_config_name ("megacore": one device per chip)
    source: str = ""


CHIPS: dict[str, Chip] = {
    "v4": Chip("tpu", "v4", 32 * GIB, 275e12, 1200 * GB, 4, cores_in_name=2, grid_dims=3,
               chip_config="megacore", source="cloud.google.com/tpu/docs/v4"),
    "v5litepod": Chip("tpu", "v5e", 16 * GIB, 197e12, 819 * GB, 4,  # XLA leaves 15.75 GiB.
                      source="cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("tpu", "v5", 95 * GB, 459e12, 2765 * GB, 4, cores_in_name=2, grid_dims=3,
                chip_config="megacore", source="cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("tpu", "v6e", 32 * GB, 918e12, 1640 * GB, 4,
                source="cloud.google.com/tpu/docs/v6e"),
    "tpu7x": Chip("tpu", "tpu7x", 192 * GB, 2307e12, 7370 * GB, 4, devices_per_chip=2,
                  cores_in_name=2, grid_dims=3, source="cloud.google.com/tpu/docs/tpu7x"),
    "h100": Chip("cuda", "h100_sxm", 80 * GB, 989e12, 3350 * GB, 8,
                 source="NVIDIA H100 Tensor Core GPU datasheet (SXM, dense bf16)"),
    "h200": Chip("cuda", "h200", 141 * GB, 989e12, 4800 * GB, 8,
                 source="NVIDIA H200 Tensor Core GPU datasheet (SXM, dense bf16)"),
    "a100": Chip("cuda", "a100_sxm_80", 80 * GB, 312e12, 2039 * GB, 8,
                 source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB, dense bf16)"),
}
ALIASES = {"v5e": "v5litepod"}  # Both spellings of v5e are in use.


@dataclasses.dataclass(frozen=True)
class Target:
    """A named slice (or GPU host) of `chips` chips, and how many of them (`slices`)."""

    name: str
    chip: Chip
    chips: int
    slices: int = 1

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip * self.slices

    @property
    def topology(self) -> str:
        """libtpu's topology name ("v5e:4x4"), or the GPU topology ("1 x hosts x GPUs per host")."""
        if self.chip.platform == "cuda":
            return f"1x{self.slices}x{self.chips}"
        shape = slice_shape(self.chips, self.chip.grid_dims)
        return f"{self.chip.generation}:{'x'.join(map(str, shape))}"


def known_names() -> str:
    return ", ".join(f"{name}-N" for name in CHIPS) + " (e.g. v5litepod-16, v5p-128, h100-8)"


def parse(name: str, slices: int = 1) -> Target:
    """`v5p-128` -> Target; a ValueError naming the known families otherwise."""
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    family = ALIASES.get(match.group(1), match.group(1)) if match else None
    if family not in CHIPS:
        raise ValueError(f"--topology {name!r}: unknown accelerator; known: {known_names()}")
    chip, count = CHIPS[family], int(match.group(2))
    if count % chip.cores_in_name or count < chip.cores_in_name:
        raise ValueError(f"--topology {name!r}: {family} counts {chip.cores_in_name} cores per "
                         f"chip; the number must be a multiple of {chip.cores_in_name}")
    chips = count // chip.cores_in_name
    if chip.platform == "tpu" and (chips & (chips - 1) or chips < 4 and chips != 1):
        raise ValueError(f"--topology {name!r}: TPU slices here have 1 or 4, 8, 16, ... "
                         "(a power of two) chips")
    if slices < 1:
        raise ValueError(f"--slices {slices}: must be at least 1")
    return Target(name, chip, chips, slices)


def slice_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Google's slice shapes: from 2x2(x1), double the smallest side (the last on ties):
    2x2 -> 2x4 -> 4x4 -> 4x8 ...; 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ..."""
    if chips == 1:
        return (1,) * dims
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        last = max(i for i, side in enumerate(shape) if side == smallest)
        shape[last] *= 2
    return tuple(shape)


# Device files of an attached TPU (v4 and v5p: accel, v5e and later: vfio) and NVIDIA GPU.
TPU_DEVICE_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")
GPU_DEVICE_FILES = ("/dev/nvidia[0-9]*",)


def tpu_attached() -> bool:
    """Whether this host has a TPU, told without starting JAX (libtpu may be installed on
    any host: the `tpu-compile` extra)."""
    return any(glob.glob(pattern) for pattern in TPU_DEVICE_FILES)


def attached() -> bool:
    """Whether this host has a TPU or GPU, told without starting JAX."""
    return tpu_attached() or any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def use_cpu_where_nothing_is_attached(environ: dict[str, str] | None = None) -> None:
    """With the compiler extras installed (libtpu, the CUDA plugin), JAX would probe for a TPU
    and a GPU and warn on stderr in every CPU process; on a host with neither, pick the CPU
    (JAX_PLATFORMS=cpu) unless the user chose. TPU and GPU hosts are left as they are."""
    environ = os.environ if environ is None else environ
    if not environ.get("JAX_PLATFORMS") and not attached():
        environ["JAX_PLATFORMS"] = "cpu"


def gpu_target_config(chip: Chip) -> str:
    """The device description XLA's GPU compiler compiles for (shipped in `gpu_specs/`)."""
    return (resources.files("cae_jax") / "gpu_specs" / f"{chip.generation}.txtpb").read_text()


def compile_only_devices(target: Target) -> list[jax.Device]:
    """The target's devices, for compiling only: no accelerator needed, none used."""
    from jax.experimental import topologies

    if target.chip.platform == "cuda":
        topology = topologies.get_topology_desc(
            platform="cuda", topology=target.topology,
            target_config=gpu_target_config(target.chip))
    else:
        if not tpu_attached():
            # libtpu takes /tmp/libtpu_lockfile so that one process owns the TPU; compiling
            # owns none, and with the lock a second compile on this host would fail
            # ("Internal error when accessing libtpu multi-process lockfile").
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topology = topologies.get_topology_desc(
            target.topology, platform="tpu", chip_config_name=target.chip.chip_config,
            num_slices=target.slices)
    return list(topology.devices)
