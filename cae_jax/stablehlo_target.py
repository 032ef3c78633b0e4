"""StableHLO that TensorFlow can read: the version jax2tf writes into a SavedModel.

`jax.export` serializes StableHLO at the version four weeks behind the jaxlib it runs on. A
SavedModel is read by TensorFlow's own StableHLO, which can be older: jax 0.12 writes 1.18.0,
TensorFlow 2.21 reads up to 1.13.7, and such a SavedModel fails at its first call
("unregistered operation 'vhlo.custom_call_v2'"). jax has no public setting for the target
version, only the private `_export._module_to_bytecode`; `for_tensorflow` swaps it for the
duration of a SavedModel write and checks first that it still looks as expected, so a jax that
changes it fails the export by name instead of writing a SavedModel that cannot run
(`tests/test_stablehlo_target.py` fails on such a jax too).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator


def versions() -> dict[str, str]:
    """{"jax": what jax.export writes, "tensorflow": the newest TF reads, "target": the older}."""
    from jax._src.lib.mlir.dialects import hlo
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

    jax_version = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_4)
    tf_version = tf_stablehlo.get_current_version()
    return {"jax": jax_version, "tensorflow": tf_version,
            "target": tf_stablehlo.get_smaller_version(jax_version, tf_version)}


def _private_hook():
    """jax's serializer, after checking it is the function this module replaces."""
    from jax._src.export import _export

    hook = getattr(_export, "_module_to_bytecode", None)
    source = inspect.getsource(hook) if callable(hook) else ""
    if "serialize_portable_artifact" not in source or "target_version" not in source:
        import jax

        raise RuntimeError(
            f"jax {jax.__version__} changed how jax.export serializes StableHLO "
            "(jax._src.export._export._module_to_bytecode), so cae-jax cannot target the "
            "version TensorFlow reads; export with --formats jax_export, or use the jax "
            "versions of constraints-newest.txt")
    return _export


@contextlib.contextmanager
def for_tensorflow() -> Iterator[str]:
    """Within: jax.export (and so jax2tf) writes StableHLO at `versions()["target"]`."""
    from jax._src import xla_bridge
    from jax._src.lib import _jax

    export_module = _private_hook()
    target = versions()["target"]
    original = export_module._module_to_bytecode

    def to_bytecode(module) -> bytes:
        return _jax.mlir.serialize_portable_artifact(
            module, target, xla_bridge.get_backend().serialize_with_sdy)

    export_module._module_to_bytecode = to_bytecode
    try:
        yield target
    finally:
        export_module._module_to_bytecode = original
