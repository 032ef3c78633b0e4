"""EfficientNet-B4 as the CAE's encoder: timm's layout, timm's weights with parity, and the
import recording its backbone.

The reference is `cae_jax/bench/torch_efficientnet.py`, timm's `efficientnet_b4` written in
plain torch (timm needs torchvision, which does not load beside the pinned CPU torch).
"""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cae_jax import backbones, checkpoints, main, models, sharding, train_step, weights
from cae_jax import config as config_lib
from cae_jax.backbones import efficientnet
from tests import datasets

TINY = "configs/tiny_effb4.py"


def test_full_size_is_timms_b4():
    config = config_lib.default_config()
    config.model.encoder = efficientnet.encoder_config()
    config.model.image_size = 380
    model = nnx.eval_shape(lambda: models.build_model(config.model))
    encoder = nnx.state(model.encoder, nnx.Param)
    # timm's efficientnet_b4 with num_classes=0 has 17,548,616 parameters.
    assert sum(x.size for x in jax.tree.leaves(encoder)) == 17_548_616
    assert [len(stage) for stage in model.encoder.blocks] == [2, 4, 4, 6, 6, 8, 2]
    assert (model.encoder.features, model.encoder.stride) == (1792, 32)
    graphdef, params, stats = models.abstract_model(config.model)
    latent = jax.eval_shape(
        lambda p, b, x: nnx.merge(graphdef, p, b).encoder(x, train=False), params, stats,
        jax.ShapeDtypeStruct((1, 380, 380, 3), jnp.float32))
    assert latent.shape == (1, 12, 12, 1792)


def test_encoder_input_is_imagenet_normalization():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    signed = pixels / 127.5 - 1  # The model's target range, from which it normalizes.
    ours = backbones.encoder_input(jnp.asarray(signed), efficientnet)
    expected = (pixels / 255 - np.array(efficientnet.MEAN)) / np.array(efficientnet.STD)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert backbones.encoder_input(signed, backbones.xception) is signed


def test_unknown_encoder_name_is_one_clear_problem():
    config = config_lib.load_config(TINY)
    config.model.encoder.name = "resnet"
    with pytest.raises(ValueError, match="model.encoder.name='resnet' is not one of xception, "
                                         "efficientnet_b4"):
        config_lib.validate(config)


def test_config_without_encoder_name_is_xception():
    """A config.json written before `model.encoder.name` existed."""
    saved = json.loads(config_lib.to_json(config_lib.load_config("configs/tiny.py")))
    del saved["model"]["encoder"]["name"]
    config = config_lib.from_saved(saved, "config.json")
    config_lib.validate(config)
    assert config.model.encoder.name == "xception"
    # A model group read as it is (no defaults merged) builds Xception too.
    model = models.build_model(config_lib.ConfigDict(saved["model"]))
    assert type(model.encoder) is backbones.xception.Xception


def timm_weights(tmp_path, channel_multiplier, depth_multiplier):
    """A timm-layout B4 with random weights and BN statistics, saved as safetensors; skips
    where torch (the `bench` extra; the newest stack leaves it out) is absent."""
    torch = pytest.importorskip("torch")
    import safetensors.torch as safetensors_torch

    from cae_jax.bench.torch_efficientnet import EfficientNet
    from tests.torch_helpers import randomize_batch_norm

    torch.manual_seed(0)
    model = EfficientNet(channel_multiplier, depth_multiplier).eval()
    randomize_batch_norm(model, torch.Generator().manual_seed(0))
    path = tmp_path / "efficientnet_b4.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(path))
    return model, path


def imported_encoder(config, out):
    config.init_from = str(out)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    state = train_step.create_train_state(config, train_step.abstract_state(config, mesh))
    graphdef, _, _ = models.abstract_model(config.model)

    @jax.jit
    def encode(params, batch_stats, x):
        return nnx.merge(graphdef, params, batch_stats, copy=True).encoder(x, train=False)

    return lambda x: np.asarray(encode(state.params, state.batch_stats, x))


def test_timm_import_gives_timm_features(tmp_path):
    """Full-size B4 (timm's widths and depths), at 96x96 to keep the CPU test short."""
    model, path = timm_weights(tmp_path, 1.4, 1.8)
    import torch
    assert sum(p.numel() for p in model.parameters()) == 17_548_616
    out = tmp_path / "imported"
    assert main.main(["import-weights", "--format", "timm", "--arch", "efficientnet_b4",
                      "--input", str(path), "--output", str(out)]) == 0
    meta = json.loads((out / weights.IMPORT_META).read_text())
    assert (meta["encoder"], meta["bn_epsilon"], "pool_padding" in meta) == (
        "efficientnet_b4", 1e-5, False)

    config = config_lib.default_config()
    config.model.encoder = efficientnet.encoder_config()
    config.model.bn_epsilon = 1e-5
    encode = imported_encoder(config, out)
    images = np.random.default_rng(1).normal(0, 1, (2, 96, 96, 3)).astype(np.float32)
    ours = encode(images)
    with torch.inference_mode():
        theirs = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 3, 3, 1792)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_import_refuses_other_sizes_and_backbones(tmp_path):
    _, path = timm_weights(tmp_path, 0.25, 0.3)
    # The file is a narrow B4; the default (full-size) config needs wider tensors.
    with pytest.raises(SystemExit, match=r"efficientnet_b4.safetensors: timm tensor "
                       r"'blocks.0.0.bn1.bias' has shape \(8,\) \(in our layout\); the "
                       r"config's efficientnet_b4 needs \(48,\)"):
        main.main(["import-weights", "--format", "timm", "--arch", "efficientnet_b4",
                   "--input", str(path), "--output", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="model.encoder.name is 'xception'; --arch "
                                         "efficientnet_b4 needs 'efficientnet_b4'"):
        main.main(["import-weights", "--format", "timm", "--arch", "efficientnet_b4",
                   "--config", "configs/tiny.py", "--input", str(path),
                   "--output", str(tmp_path / "other")])
    out = tmp_path / "tiny"
    assert main.main(["import-weights", "--format", "timm", "--arch", "efficientnet_b4",
                      "--config", TINY, "--input", str(path), "--output", str(out)]) == 0
    xception_config = config_lib.load_config("configs/tiny.py")
    xception_config.init_from = str(out)
    xception_config.model.bn_epsilon = 1e-5
    with pytest.raises(ValueError, match="holds efficientnet_b4 weights; the config's encoder "
                                         "is xception"):
        weights.import_meta(xception_config)
    b4_config = config_lib.load_config(TINY)
    b4_config.init_from = str(out)
    assert weights.import_meta(b4_config)["encoder"] == "efficientnet_b4"


def test_tiny_b4_cae_trains_exports_and_predicts(tmp_path):
    """`train --config configs/tiny_effb4.py`, `export`, `predict`: the bundle scores a face as
    the trained checkpoint does in JAX."""
    data = datasets.write(tmp_path / "toy", {"train": (8, 8), "validation": (4, 4)})
    workdir, bundle = tmp_path / "run", tmp_path / "bundle"
    assert main.main(["train", "--config", TINY, "--workdir", str(workdir),
                      f"--config.input.train_dirs=('{data}',)", "--config.train.steps=2",
                      "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
                      "--config.train.log_every=1"]) == 0
    assert main.main(["export", "--workdir", str(workdir), "--out", str(bundle),
                      "--formats="]) == 0
    face = datasets.face_crop(3)
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    out = tmp_path / "preds.json"
    assert main.main(["predict", "--model", str(bundle), "--no-detect", str(image),
                      "--out", str(out)]) == 0
    score = json.loads(out.read_text())["results"][0]["score"]

    config, params, stats, step = checkpoints.restore_inference(workdir)
    assert (config.model.encoder.name, step) == ("efficientnet_b4", 2)
    graphdef, _, _ = models.abstract_model(config.model)
    outputs, _ = models.forward(graphdef, params, stats, face[None], train=False)
    assert score == pytest.approx(float(jax.nn.sigmoid(outputs["logit"][0])), abs=1e-5)


def test_b4_config_has_a_torch_peer_around_timms_b4():
    pytest.importorskip("torch")
    from cae_jax.bench import torch_peer
    from cae_jax.bench.torch_efficientnet import EfficientNet

    config = config_lib.load_config(TINY)
    assert torch_peer.unsupported_reason(config.model) == ""
    peer = torch_peer.TorchCAE(config.model)
    ours = models.build_model(config.model).encoder
    assert isinstance(peer.encoder, EfficientNet) and peer.encoder.features == ours.features
    assert sum(p.numel() for p in peer.encoder.parameters()) == sum(
        x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))


def test_saved_b4_config_reads_back_with_its_own_encoder_defaults():
    """config.json and a bundle's model merge onto the defaults of the backbone they name."""
    config = config_lib.load_config(TINY)
    saved = json.loads(config_lib.to_json(config))
    del saved["model"]["encoder"]["drop_path_rate"]  # A field added after it was written.
    read = config_lib.from_saved(saved, "config.json")
    assert read.model.encoder.to_dict() == {**config.model.encoder.to_dict(),
                                            "drop_path_rate": 0.2}
    model = config_lib.from_saved(saved["model"], "model.json",
                                  config_lib.default_config().model)
    assert model.encoder.name == "efficientnet_b4" and "stem_features" not in model.encoder
