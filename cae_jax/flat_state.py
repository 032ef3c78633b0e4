"""Model states as flat {"a.b.c": array} mappings: the layout bundles and imported weights use.

Dotted paths keep a saved file readable by name and independent of how NNX nests its pytrees,
so an export bundle or an `import-weights` output restores into any state with those paths.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def flatten(state: nnx.State) -> dict[str, Any]:
    """{"a.b.c": array (or ShapeDtypeStruct)} of every leaf of `state`."""
    return {".".join(map(str, path)): leaf.get_value() for path, leaf in nnx.to_flat_state(state)}


def unflatten(state: nnx.State, arrays: dict[str, Any]) -> nnx.State:
    """A copy of `state` (real or shape-only) with each leaf taken from `arrays` by its path.

    Raises ValueError naming the first path `arrays` lacks or holds in another shape (arrays
    of another model), which the commands report as a bad input file.
    """
    state = jax.tree.map(lambda x: x, state)
    for path, leaf in nnx.to_flat_state(state):
        key = ".".join(map(str, path))
        if key not in arrays:
            raise ValueError(f"no array for {key!r}: saved from another model")
        want, got = tuple(leaf.get_value().shape), tuple(arrays[key].shape)
        if got != want:
            raise ValueError(f"array {key!r} has shape {got}, the model's is {want}: saved "
                             "from another model")
        leaf.set_value(arrays[key])
    return state


def restore_target(arrays: dict[str, Any], dtype: Any = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes (or `dtype`) and shardings of flat arrays: what Orbax restores into."""
    return {key: jax.ShapeDtypeStruct(value.shape, dtype or value.dtype, sharding=value.sharding)
            for key, value in arrays.items()}
