"""A new backbone is one module and one line in `backbones.BACKBONES`: a test-only encoder,
registered here and nowhere else, builds, trains a step, exports and imports timm weights."""

import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from safetensors.numpy import save_file

from cae_jax import backbones, export, flat_state, main, models, sharding, train_step
from cae_jax import config as config_lib
from tests.test_train_step import face_batch

NAME = "two_convs"


class TwoConvs(nnx.Module):
    """conv_stem (3x3/2) + bn1 + ReLU, conv_head (3x3/16) + bn2 + ReLU: stride 32."""

    def __init__(self, encoder: ConfigDict, *, layers, rngs: nnx.Rngs):
        self.conv_stem = layers.conv(3, encoder.width, 3, stride=2, padding="SAME", rngs=rngs)
        self.bn1 = layers.batch_norm(encoder.width, rngs=rngs)
        self.conv_head = layers.conv(encoder.width, 2 * encoder.width, 3, stride=16,
                                     padding="SAME", rngs=rngs)
        self.bn2 = layers.batch_norm(2 * encoder.width, rngs=rngs)
        self.features, self.stride = 2 * encoder.width, 32

    def __call__(self, x, *, train, dropout_key=None):
        x = nnx.relu(self.bn1(self.conv_stem(x), use_running_average=not train))
        return nnx.relu(self.bn2(self.conv_head(x), use_running_average=not train))


def encoder_config() -> ConfigDict:
    return ConfigDict({"name": NAME, "width": 8})


MODULE = types.ModuleType(f"tests.backbone_{NAME}")
MODULE.__dict__.update(
    NAME=NAME, TIMM_ARCH=NAME, TIMM_CONVENTIONS={"bn_epsilon": 1e-5},
    MEAN=(0.5, 0.4, 0.3), STD=(0.2, 0.3, 0.4), encoder_config=encoder_config,
    RULES=(("width", config_lib._integer(1)),),
    latent_size=lambda encoder, image_size: -(-image_size // 32),  # SAME convs: ceil.
    build=lambda model_config, *, layers, rngs: TwoConvs(model_config.encoder, layers=layers,
                                                         rngs=rngs))
CONFIG_FILE = f'''
from cae_jax import backbones
from cae_jax.config import load_config, shipped_config


def get_config():
    config = load_config(shipped_config("tiny"))
    config.model.encoder = backbones.BACKBONES["{NAME}"].encoder_config()
    config.model.bn_epsilon = 1e-5
    return config
'''


@pytest.fixture
def registered(monkeypatch, tmp_path):
    monkeypatch.setitem(backbones.BACKBONES, NAME, MODULE)  # The one table line.
    monkeypatch.setitem(sys.modules, MODULE.__name__, MODULE)
    path = tmp_path / "two_convs.py"
    path.write_text(CONFIG_FILE)
    return path


def test_a_new_table_entry_builds_trains_exports_and_imports(registered, tmp_path):
    config = config_lib.load_config(registered)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    state, metrics = train_step.make_train_step(config, abstract)(state, face_batch())
    assert int(state.step) == 1 and float(metrics["finite"]) == 1.0
    assert np.isfinite(float(metrics["loss"]))

    bundle = export.export_bundle(config, state.params, state.batch_stats, tmp_path / "bundle",
                                  formats=("jax_export",), platforms=("cpu",))
    images = face_batch()["image"][:2]
    classify = jax.export.deserialize((bundle / "classify.jax").read_bytes())
    outputs, _ = models.forward(abstract.graphdef, state.params, state.batch_stats,
                                images, train=False)
    np.testing.assert_allclose(classify.call(images)["probability"],
                               jax.nn.sigmoid(outputs["logit"]), rtol=1e-5, atol=1e-6)

    # timm-named tensors in PyTorch's layout: the importer walks the module tree.
    rng = np.random.default_rng(0)
    ours = flat_state.flatten(state.params["encoder"])
    ours.update(flat_state.flatten(state.batch_stats["encoder"]))
    leaves = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}
    tensors, expected = {}, {}
    for path, value in ours.items():
        *module, leaf = path.split(".")
        expected[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        theirs = expected[path].transpose(3, 2, 0, 1) if leaf == "kernel" else expected[path]
        tensors[".".join([*module, leaves[leaf]])] = np.ascontiguousarray(theirs)
    save_file(tensors, str(tmp_path / "two_convs.safetensors"))
    out = tmp_path / "imported"
    assert main.main(["import-weights", "--format", "timm", "--arch", NAME, "--config",
                      str(registered), "--input", str(tmp_path / "two_convs.safetensors"),
                      "--output", str(out)]) == 0
    config.init_from = str(out)
    loaded = train_step.create_train_state(config, abstract)
    got = flat_state.flatten(loaded.params["encoder"])
    got.update(flat_state.flatten(loaded.batch_stats["encoder"]))
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)
