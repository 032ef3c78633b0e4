"""The accelerator path, checked without an accelerator: the full-size train step, eval step and
serving functions lower for cuda and tpu with XLA's native layers and nothing of the CPU's, and
a bundle exported here holds cpu, cuda and tpu programs that score like a CPU-only one."""

import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import config as config_lib
from cae_jax import device_augment, export, models, serving, sharding, train_step
from cae_jax.ops import cpu_kernels

BATCH = 32
ACCELERATORS = ("cuda", "tpu")
# Ops whose counts tell the layer forms apart: XLA's convolutions (grouped for the depthwise
# convs, input-dilated for the transposed convs) and pooling on GPU/TPU; matrix products,
# shifted slices and FFI kernels on the CPU.
FORM_OPS = ("convolution", "dot_general", "reduce_window", "select_and_scatter", "custom_call")


def form_profile(module_text: str) -> collections.Counter:
    profile = collections.Counter(f"stablehlo.{op}" for op in re.findall(
        r"stablehlo\.(\w+)", module_text) if op in FORM_OPS)
    profile.update(f"feature_group_count={n}"
                   for n in re.findall(r"feature_group_count = (\d+)", module_text))
    profile.update(f"lhs_dilate={d}" for d in re.findall(r"lhs_dilate = (\[[\d, ]+\])",
                                                         module_text))
    profile.update(f"custom_call @{t}" for t in re.findall(r"custom_call @(\w+)", module_text))
    return profile


def full_size_config(dtype: str, layer_impl: str = "auto"):
    config = config_lib.load_config("configs/ffpp_c23.py")
    config.model.dtype = dtype
    config.model.layer_impl = layer_impl
    return config


def traced_programs(config) -> dict:
    """The train step, eval step and both serving functions at 299 and batch 32, traced (not
    lowered) from shapes alone. The train step augments on the device, as it does on GPU/TPU
    (`input.augment.on_device` "auto"), from a uint8 batch and the host's choices."""
    mesh = sharding.make_mesh(-1, 1)
    size = config.model.image_size
    state = jax.eval_shape(lambda: train_step.init_state(config))
    batch = {"image": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
    train_config = config.copy_and_resolve_references()
    train_config.input.augment.on_device = "on"
    train_batch = {**batch, **{f"aug_{name}": jax.ShapeDtypeStruct((BATCH,), dtype)
                               for name, dtype in device_augment.PARAM_DTYPES.items()}}
    graphdef, params, batch_stats = models.abstract_model(config.model)
    params = jax.eval_shape(
        lambda p: export.cast_for_export(config.model, p, config.model.dtype)[1], params)
    weights = (params, batch_stats)
    images = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8)
    programs = {
        "train step": train_step.make_train_step(
            train_config, train_step.abstract_state(train_config, mesh)).trace(state, train_batch),
        "eval step": train_step.make_eval_step(
            config, train_step.abstract_state(config, mesh)).trace(state, batch),
    }
    for name, fn in serving.serving_fns(graphdef).items():
        programs[f"serving {name}"] = jax.jit(fn).trace(weights, images)
    return programs


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def auto_programs(request):
    return request.param, traced_programs(full_size_config(request.param))


@pytest.fixture(scope="module")
def native_profiles():
    """What XLA's native layers lower to, per program, for each accelerator (float32)."""
    programs = traced_programs(full_size_config("float32", "native"))
    return {(name, platform): form_profile(traced.lower(lowering_platforms=(platform,))
                                           .as_text())
            for name, traced in programs.items() for platform in ACCELERATORS}


@pytest.mark.slow
@pytest.mark.parametrize("platform", ACCELERATORS)
def test_full_size_programs_lower_for_accelerators_with_native_layers(
        auto_programs, native_profiles, platform):
    dtype, programs = auto_programs
    for name, traced in programs.items():
        profile = form_profile(traced.lower(lowering_platforms=(platform,)).as_text())
        leaked = [t for t in cpu_kernels.TARGETS if profile[f"custom_call @{t}"]]
        assert not leaked, f"{name} ({dtype}) for {platform} calls CPU kernels {leaked}"
        # The same layer ops as layer_impl="native": grouped (depthwise) convs, input-dilated
        # (transposed) convs where the decoder runs, max-pools, no decomposed forms.
        assert profile == native_profiles[(name, platform)], f"{name} ({dtype}) on {platform}"
        assert profile["feature_group_count=728"] >= 27 and profile["stablehlo.reduce_window"] >= 4
        assert profile["lhs_dilate=[2, 2]"] >= (0 if name == "serving classify" else 5)


@pytest.mark.slow
def test_the_same_programs_lowered_for_the_cpu_take_the_decomposed_forms(auto_programs):
    dtype, programs = auto_programs
    train = form_profile(programs["train step"].lower(lowering_platforms=("cpu",)).as_text())
    serving = form_profile(programs["serving classify"].lower(lowering_platforms=("cpu",))
                           .as_text())
    for profile in (train, serving):
        assert profile["stablehlo.reduce_window"] == 0
        assert not any(k.startswith("feature_group_count=") and k != "feature_group_count=1"
                       for k in profile)
    if dtype == "float32" and cpu_kernels.available():  # The kernels take float32 only.
        assert train["custom_call @cae_jax_depthwise_kernel_grad"] == 34
        assert train["custom_call @cae_jax_im2col"] > 0
    assert not any(k.startswith("custom_call @cae_jax") for k in serving)


@pytest.mark.slow
def test_full_size_efficientnet_b4_programs_lower_for_accelerators():
    """configs/ffpp_c23_effb4.py at 299: every program lowers for cuda and tpu with no CPU
    kernel, its 32 blocks' depthwise convs as grouped convolutions."""
    programs = traced_programs(config_lib.load_config("configs/ffpp_c23_effb4.py"))
    for name, traced in programs.items():
        for platform in ACCELERATORS:
            profile = form_profile(traced.lower(lowering_platforms=(platform,)).as_text())
            leaked = [t for t in cpu_kernels.TARGETS if profile[f"custom_call @{t}"]]
            assert not leaked, f"{name} for {platform} calls CPU kernels {leaked}"
            grouped = sum(n for k, n in profile.items()
                          if k.startswith("feature_group_count=") and k != "feature_group_count=1")
            assert grouped >= 32, f"{name} on {platform}: {grouped} grouped convs"
            assert profile["feature_group_count=48"] >= 1  # The first block's, at 1.4x width.


def test_bundle_holds_cpu_cuda_and_tpu_and_scores_like_a_cpu_only_bundle(tmp_path):
    config = config_lib.load_config("configs/tiny.py")
    state = train_step.init_state(config)
    params = state.params
    out = params["classifier"]["out"]["kernel"]
    out.set_value(out.get_value() * 0.03)  # Logits near 0: probabilities that can differ.
    # Non-trivial BatchNorm statistics, so a program that lost them would score differently.
    stats = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.key(1), s.shape),
                         state.batch_stats)
    every = export.export_bundle(config, params, stats, tmp_path / "every")
    cpu_only = export.export_bundle(config, params, stats, tmp_path / "cpu", platforms=("cpu",))
    size = config.model.image_size
    images = np.random.default_rng(3).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    scores = {}
    for name, bundle in (("every", every), ("cpu", cpu_only)):
        classify = jax.export.deserialize((bundle / "classify.jax").read_bytes())
        scores[name] = np.asarray(classify.call(images)["probability"])
        assert classify.platforms == (export.DEFAULT_PLATFORMS if name == "every" else ("cpu",))
    assert np.ptp(scores["cpu"]) > 1e-3 and 0 < scores["cpu"].min() < scores["cpu"].max() < 1
    np.testing.assert_allclose(scores["every"], scores["cpu"], rtol=1e-6, atol=1e-7)
    assert json.loads((every / serving.MODEL_JSON).read_text())["platforms"] == ["cpu", "cuda",
                                                                                 "tpu"]
    np.testing.assert_allclose(serving.load_bundle(every).predict_proba(images), scores["cpu"],
                               rtol=1e-5, atol=1e-6)
    import tensorflow as tf

    saved = tf.saved_model.load(str(every / "saved_model"))
    served = saved.signatures["serving_default"](images=tf.constant(images))["probability"]
    np.testing.assert_allclose(served.numpy(), scores["cpu"], rtol=1e-5, atol=1e-6)


def test_a_bundle_newer_than_this_reader_is_refused_by_name(tmp_path):
    config = config_lib.load_config("configs/tiny.py")
    state = train_step.init_state(config)
    bundle = export.export_bundle(config, state.params, state.batch_stats, tmp_path / "b",
                                  formats=(), platforms=("cpu",))
    meta = json.loads((bundle / serving.MODEL_JSON).read_text())
    assert meta["bundle_version"] == serving.BUNDLE_VERSION
    serving.load_bundle(bundle)  # This reader's own version loads.
    meta["bundle_version"] = serving.BUNDLE_VERSION + 1
    (bundle / serving.MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.json: bundle_version 2 is newer than this "
                                         r"cae-jax reads \(1\)"):
        serving.load_bundle(bundle)


def test_native_layer_forms_train_export_and_serve_end_to_end(tmp_path):
    """What a GPU/TPU user runs (layer_impl "native"), exercised on the CPU: training steps,
    a bundle from the checkpoint, and its scores equal to the trained model's own forward."""
    from cae_jax import checkpoints, train
    from tests import datasets

    data = datasets.write(tmp_path / "toy", {"train": (8, 8), "validation": (4, 4)})
    config = config_lib.load_config("configs/tiny.py", [
        f"--config.input.train_dirs=('{data}',)", "--config.model.layer_impl=native",
        "--config.train.steps=4", "--config.train.eval_every=4",
        "--config.train.checkpoint_every=4", "--config.train.log_every=2"])
    final = train.train(config, tmp_path / "run")
    assert np.isfinite(final["loss"]) and final["skipped_steps"] == 0
    restored, params, batch_stats, step = checkpoints.restore_inference(tmp_path / "run")
    assert step == 4 and restored.model.layer_impl == "native"
    bundle = export.export_bundle(restored, params, batch_stats, tmp_path / "bundle",
                                  platforms=("cpu", "cuda"))
    images = np.stack([datasets.face_crop(i) for i in range(4)])
    graphdef, _, _ = models.abstract_model(restored.model)
    logits = jax.jit(lambda p, s, x: models.forward(graphdef, p, s, x, train=False)[0]["logit"])(
        params, batch_stats, images)
    classify = jax.export.deserialize((bundle / "classify.jax").read_bytes())
    np.testing.assert_allclose(classify.call(images)["probability"], jax.nn.sigmoid(logits),
                               rtol=1e-5, atol=1e-6)
