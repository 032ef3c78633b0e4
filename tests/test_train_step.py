"""The sharded train step: same numbers on 1 and 8 devices; a tiny model overfits a batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage import data, transform

from cae_jax import config as config_lib
from cae_jax import layers as layers_lib
from cae_jax import models, sharding, train_step

MESHES = {"1 device": (1, 1), "data=8": (8, 1), "data=2,fsdp=4": (2, 4)}


def tiny_config(**optim):
    config = config_lib.load_config("configs/tiny.py")
    config.optim.update({"warmup_steps": 0, **optim})  # The first step already moves.
    return config


def face_batch(size=64, n=8):
    """uint8 crops of a real face photo (skimage's astronaut), labels alternating real/fake."""
    image = data.astronaut()[30:230, 150:350]
    crops = [transform.resize(np.roll(image, 8 * k, axis=1), (size, size), anti_aliasing=True,
                              preserve_range=True) for k in range(n)]
    return {"image": np.stack(crops).round().astype(np.uint8),
            "label": (np.arange(n) % 2).astype(np.int32)}


def run_steps(config, mesh_shape, batch, steps):
    data_size, fsdp = mesh_shape
    mesh = sharding.make_mesh(data_size, fsdp, jax.devices()[: data_size * fsdp])
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    step = train_step.make_train_step(config, abstract)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    history = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history, mesh


def max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


@pytest.fixture(scope="module")
def runs():
    # Adam's first update is about lr * sign(g) wherever |g| >> eps, so a gradient that is zero
    # up to float32 rounding (its sign set by the layout's reduction order) would move by +-lr.
    # A larger eps keeps the update proportional to g there, and the comparison meaningful.
    config = tiny_config(eps=1e-3)
    batch = face_batch()
    return {name: run_steps(config, shape, batch, steps=1) for name, shape in MESHES.items()}


@pytest.mark.parametrize("name", ["data=8", "data=2,fsdp=4"])
def test_sharded_step_equals_one_device(runs, name):
    ref_state, (ref,), _ = runs["1 device"]
    state, (got,), _ = runs[name]
    for key in ("loss", "bce", "recon"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=key)
    # The gradient norm sums ~10^5 squares reduced in a different order per layout.
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-3)
    assert ref["learning_rate"] > 0
    assert max_abs_diff(ref_state.params, state.params) < 1e-5
    assert max_abs_diff(ref_state.batch_stats, state.batch_stats) < 1e-5  # Global-batch BN.
    mesh = runs[name][2]
    init = jax.device_get(train_step.create_train_state(
        tiny_config(), train_step.abstract_state(tiny_config(), mesh)))
    assert max_abs_diff(init.params, state.params) > 1e-4  # The step did move the parameters.


def test_fsdp_shards_large_parameters(runs):
    _, _, mesh = runs["data=2,fsdp=4"]
    shardings = train_step.abstract_state(tiny_config(), mesh).shardings
    specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    assert any(sharding.FSDP in spec for spec in specs)  # The 32x16x4x4 decoder kernel, e.g.
    assert any(spec == jax.sharding.PartitionSpec() for spec in specs)  # BN scales replicated.


def test_tiny_model_overfits_one_batch():
    config = tiny_config(learning_rate=3e-3, weight_decay=0.0)
    config.model.classifier.dropout = 0.0
    config.train.steps = 150
    _, history, _ = run_steps(config, (1, 1), face_batch(), steps=150)
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-5:]])
    assert last < first / 10, (first, last)
    assert all(h["finite"] == 1.0 for h in history)


def test_non_finite_step_leaves_the_state_unchanged():
    config = tiny_config()
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    before = jax.device_get(state)
    batch = face_batch()
    batch["image"] = batch["image"].astype(np.float32)  # The model takes [0, 255] floats too.
    batch["image"][0, 0, 0, 0] = np.nan
    state, metrics = train_step.make_train_step(config, abstract)(state, batch)
    assert float(metrics["finite"]) == 0.0
    assert int(state.step) == 1
    after = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_keeps_float32_parameters():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    state, history, _ = run_steps(config, (1, 1), face_batch(), steps=1)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    assert np.isfinite(history[0]["loss"])


@pytest.mark.parametrize("name", ["data=8", "data=2,fsdp=4"])
def test_abstract_state_matches_the_created_state(name):
    config = tiny_config()
    data_size, fsdp = MESHES[name]
    mesh = sharding.make_mesh(data_size, fsdp, jax.devices()[: data_size * fsdp])
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    assert jax.tree.structure(abstract.shapes) == jax.tree.structure(state)
    assert jax.tree.structure(abstract.shardings) == jax.tree.structure(state)
    for shape, sharding_, leaf in zip(jax.tree.leaves(abstract.shapes),
                                      jax.tree.leaves(abstract.shardings),
                                      jax.tree.leaves(state), strict=True):
        assert (shape.shape, shape.dtype) == (leaf.shape, leaf.dtype)
        assert shape.sharding == sharding_ == leaf.sharding


def test_eval_step_with_reconstructions_adds_them_and_changes_nothing_else():
    config = tiny_config()
    mesh = sharding.make_mesh(2, 4, jax.devices())
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    batch = jax.device_put(face_batch(), sharding.batch_sharding(mesh))
    plain = jax.device_get(train_step.make_eval_step(config, abstract)(state, batch))
    full = jax.device_get(
        train_step.make_eval_step(config, abstract, with_reconstructions=True)(state, batch))
    assert set(full) == {*plain, "reconstruction"}
    for key, value in plain.items():
        np.testing.assert_allclose(full[key], value, rtol=1e-6, err_msg=key)
    outputs, _ = jax.jit(functools.partial(models.forward, abstract.graphdef, train=False))(
        jax.device_get(state.params), jax.device_get(state.batch_stats), face_batch()["image"])
    recon = outputs["reconstruction"]
    np.testing.assert_allclose(full["reconstruction"], recon, rtol=1e-5, atol=1e-5)


def test_model_takes_uint8_or_float_pixels_and_returns_its_target_in_minus_one_one():
    graphdef, params, batch_stats = models.split_model(models.build_model(tiny_config().model))
    run = jax.jit(functools.partial(models.forward, graphdef, train=False))
    images = face_batch(n=2)["image"]
    from_uint8, _ = run(params, batch_stats, images)
    from_float, _ = run(params, batch_stats, images.astype(np.float32))
    # Equal to float32 rounding: XLA fuses the conversion and division (which it may turn into
    # a multiply by the reciprocal) into the first layer per input dtype.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 from_uint8, from_float)
    np.testing.assert_allclose(from_uint8["target"], (images.astype(np.float64) - 127.5) / 127.5,
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_steps_take_uint8_images_wherever_augmentation_runs(on_device):
    """The model normalizes its input: train and eval batches hold uint8 images, with the
    host's augmentation choices where the train step augments on the device."""
    config = tiny_config()
    config.input.augment.on_device = on_device
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    train, evaluate = (train_step.batch_shapes(config, mesh, 8, train=t) for t in (True, False))
    assert train["image"].dtype == evaluate["image"].dtype == np.uint8
    assert any(k.startswith("aug_") for k in train) == (on_device == "on")
    assert set(evaluate) == {"image", "label"}


def test_train_step_lowers_past_two_to_the_31_elements_per_batch_norm_channel():
    """The last decoder BatchNorm sums B * 64 * 64 elements per channel: past 2**31 at this
    global batch (a pod's, e.g. v5p-128 at 1024 per chip for the full-size model). Shapes
    only, so nothing is allocated; the CPU's written-out BatchNorm gradient is traced too."""
    config = tiny_config()
    batch_size = 2**31 // (64 * 64) + 8
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    abstract = train_step.abstract_state(config, mesh)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, 64, 64, 3), np.uint8),
             "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}
    lowered = train_step.make_train_step(config, abstract).lower(abstract.shapes, batch)
    assert f"tensor<{batch_size}x64x64x8xf32>" in lowered.as_text()


@pytest.mark.parametrize("bn_group", [0, 1, 2, 4])
def test_batch_norm_statistics_per_group_of_devices_equal_numpy(bn_group):
    """On the 8-device mesh, a batch of 16 (2 per device): statistics over the whole batch,
    each device's own, or groups of 2 and 4 devices, as numpy computes them per group."""
    mesh = sharding.make_mesh(8, 1)
    groups = 8 // bn_group if bn_group else 1
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(16, 3, 3, 4)) * np.arange(1, 17)[:, None, None, None]
         + np.arange(16)[:, None, None, None]).astype(np.float32)  # Each device's own scale.
    layer = layers_lib.BatchNorm(4, layer_impl="auto", groups=groups, momentum=0.9, epsilon=1e-3,
                                 dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def normalize(state, x):
        layer = nnx.merge(graphdef, state)
        return layer(x, use_running_average=False), nnx.state(layer, nnx.BatchStat)

    y, stats = normalize(state, jax.device_put(x, sharding.batch_sharding(mesh)))
    grouped = x.astype(np.float64).reshape(groups, -1, 3, 3, 4)
    mean = grouped.mean(axis=(1, 2, 3), keepdims=True)
    var = grouped.var(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, ((grouped - mean) / np.sqrt(var + 1e-3)).reshape(x.shape),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["mean"][...], 0.1 * mean.mean(axis=0).ravel(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"][...], 0.9 + 0.1 * var.mean(axis=0).ravel(),
                               rtol=1e-5)


def test_batch_norm_group_must_divide_the_devices():
    config = tiny_config()
    config.model.bn_group = 3
    with pytest.raises(ValueError, match="model.bn_group=3 must divide the mesh's 8 devices"):
        train_step.abstract_state(config, sharding.make_mesh(8, 1))


def test_per_device_batch_norm_trains_on_the_sharded_mesh():
    config = tiny_config()
    config.model.bn_group = 1
    _, history, _ = run_steps(config, (8, 1), face_batch(), steps=1)
    assert np.isfinite(history[0]["loss"])
