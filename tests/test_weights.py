"""Full-size shapes and parameter count; encoder parity with Keras Xception via the importer."""

import jax
import numpy as np
import pytest
from flax import nnx

from cae_jax import config as config_lib
from cae_jax import main, models, sharding, train_step

keras = pytest.importorskip("keras")


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def encode(graphdef, params, batch_stats, images):
    return nnx.merge(graphdef, params, batch_stats, copy=True).encoder(images, train=False)


def randomize(model, seed=0):
    """Random values for every weight, BN statistics included (fresh ones are 0 and 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        new = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if "variance" in w.path:
                new.append(rng.uniform(0.5, 1.5, shape))
            elif "gamma" in w.path:
                new.append(rng.uniform(0.8, 1.2, shape))
            elif len(shape) == 1:
                new.append(rng.normal(0, 0.1, shape))
            else:
                fan_in = 9 if "depthwise" in w.path else int(np.prod(shape[:-1]))
                new.append(rng.normal(0, np.sqrt(2.0 / fan_in), shape))
        if new:
            layer.set_weights([a.astype(np.float32) for a in new])


def test_full_size_parameter_count_and_shapes():
    config = config_lib.default_config()
    graphdef, params, stats = models.abstract_model(config.model)
    assert count(params["encoder"]) == 20_806_952  # timm legacy_xception without its fc.
    assert count(params["encoder"]) + count(stats["encoder"]) == 20_861_480  # Keras notop.
    # Decoder: ConvTranspose 4x4 (no bias) + BatchNorm scale/bias per stage from 2048
    # channels, then a 3x3 conv to RGB with bias.
    widths = (2048, 512, 256, 128, 64, 32)
    stages = sum(a * b * 16 + 2 * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert count(params["decoder"]) == stages + 32 * 3 * 9 + 3 == 19_565_347
    assert count(stats["decoder"]) == 2 * sum(widths[1:])  # Running mean and variance.
    # Classifier: Dense 2048 -> 256 and 256 -> 1, with biases.
    assert count(params["classifier"]) == 2048 * 256 + 256 + 256 + 1 == 524_801
    assert "classifier" not in stats
    images = jax.ShapeDtypeStruct((2, 299, 299, 3), np.uint8)
    outputs, _ = jax.eval_shape(
        lambda p, s, x: models.forward(graphdef, p, s, x, train=False), params, stats, images
    )
    logits, recon = outputs["logit"], outputs["reconstruction"]
    latent = jax.eval_shape(lambda p, s, x: encode(graphdef, p, s, x), params, stats, images)
    assert (logits.shape, recon.shape, latent.shape) == ((2,), (2, 299, 299, 3), (2, 10, 10, 2048))


@pytest.mark.parametrize("size, batch, latent", [
    (128, 2, 4),  # Sides 16 -> 8 are even there: exercises the "same" max-pool padding.
    pytest.param(299, 1, 10, marks=pytest.mark.slow),  # The model's size (74 -> 37 is even).
])
def test_keras_import_gives_keras_features(size, batch, latent, tmp_path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.Xception(weights=None, include_top=False,
                                        input_shape=(size, size, 3))
    randomize(model)
    h5 = tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(h5, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    out = tmp_path / "imported"
    assert main.main(["import-weights", "--format", "keras", "--input", str(h5),
                      "--output", str(out)]) == 0

    config = config_lib.default_config()
    config.model.image_size = size
    config.init_from = str(out)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(ValueError, match="pool_padding"):  # Keras weights need TF's conventions.
        train_step.create_train_state(config, train_step.abstract_state(config, mesh))
    config.model.pool_padding = "same"
    config.model.bn_epsilon = 1e-3
    state = train_step.create_train_state(config, train_step.abstract_state(config, mesh))

    graphdef, _, _ = models.abstract_model(config.model)
    images = np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 3))
    images = images.astype(np.float32)
    ours = np.asarray(jax.jit(encode, static_argnums=0)(
        graphdef, state.params, state.batch_stats, images))
    theirs = model.predict(images, verbose=0)
    assert ours.shape == theirs.shape == (batch, latent, latent, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
