"""Mesh axes and sharding rules, named once and used everywhere.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (parameters and optimizer
state sharded, batch split too). A global batch is split over both axes; a parameter is
sharded over `fsdp` along its largest dimension that `fsdp` divides, else replicated. Devices
are laid out in the topology's order (`mesh_utils`: neighbours on the ICI torus); across
TPU slices (`slices` > 1, multislice) the `data` axis spans the slices over the data-center
network, outermost, so only the gradient all-reduce crosses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
MESH_AXES = (DATA, FSDP)
BATCH_AXES = (DATA, FSDP)  # The leading (batch) dimension is split over both axes.
MIN_FSDP_SIZE = 2**14  # Smaller arrays (biases, BN scales) are replicated: not worth a gather.


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None,
              slices: int = 1) -> Mesh:
    """A (data, fsdp) mesh; `data=-1` takes every device that `fsdp` leaves over; with
    `slices` > 1 the data axis spans that many TPU slices."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the {len(devices)} devices")
    if data == -1:
        data = len(devices) // fsdp
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {len(devices)} devices")
    if slices == 1:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices,
                                             allow_split_physical_axes=True)
    elif data % slices:
        raise ValueError(f"mesh.slices={slices} must divide mesh data={data}")
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what the programs that run
    on it are compiled for."""
    return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """The one sharding rule for parameters and everything shaped like them."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, tree):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by `param_spec`."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp_size)), tree)
