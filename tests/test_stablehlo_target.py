"""SavedModels get StableHLO that TensorFlow reads, through jax's private serializer hook: these
tests fail when a jax release changes that hook (the end-to-end SavedModel check is in
test_export.py)."""

import jax
import jax.numpy as jnp
import pytest
from jax._src.export import _export
from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

from cae_jax import stablehlo_target


def polymorphic_export() -> bytes:
    """A module with a symbolic batch, so it holds jax's shape-assertion custom call."""
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, 4), jnp.float32)
    return jax.export.export(jax.jit(lambda x: jnp.sin(x).sum(axis=0)))(spec).mlir_module_serialized


def test_target_is_the_older_of_what_jax_writes_and_tensorflow_reads():
    v = stablehlo_target.versions()
    assert v["tensorflow"] == tf_stablehlo.get_current_version()
    assert v["target"] in (v["jax"], v["tensorflow"])
    assert tf_stablehlo.get_smaller_version(v["target"], v["tensorflow"]) == v["target"]
    assert tf_stablehlo.get_smaller_version(v["target"], v["jax"]) == v["target"]


def test_jax_export_goes_through_the_hook_and_tensorflow_reads_the_result(monkeypatch):
    calls = []
    with stablehlo_target.for_tensorflow() as target:
        hooked = _export._module_to_bytecode
        monkeypatch.setattr(_export, "_module_to_bytecode",
                            lambda module: calls.append(target) or hooked(module))
        serialized = polymorphic_export()
        monkeypatch.undo()
    assert calls == [target], "jax.export no longer serializes through _module_to_bytecode"
    assert tf_stablehlo.deserialize_portable_artifact_str(serialized).startswith(b"ML\xefR")
    assert _export._module_to_bytecode is not hooked  # Restored on the way out.


def test_a_changed_hook_fails_the_export_by_name(monkeypatch):
    monkeypatch.setattr(_export, "_module_to_bytecode", lambda module: b"")
    with pytest.raises(RuntimeError, match="--formats jax_export"):
        with stablehlo_target.for_tensorflow():
            pass
