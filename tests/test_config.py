"""Config files and absl-style overrides."""

import pytest

from cae_jax import config as config_lib


def test_overrides_parse_to_the_field_type():
    c = config_lib.load_config("configs/tiny.py", [
        "--config.loss.recon_weight=2", "--config.loss.recon", "l1",
        "--config.model.encoder.entry_features=(8,8,16)", "--config.loss.recon_real_only=true",
        "--config.train.steps=7",
    ])
    assert c.loss.recon_weight == 2.0 and isinstance(c.loss.recon_weight, float)
    assert c.loss.recon == "l1"
    assert c.model.encoder.entry_features == (8, 8, 16)
    assert c.loss.recon_real_only is True
    assert c.train.steps == 7


@pytest.mark.parametrize("item, error, named", [
    ("--config.loss.nope=1", ValueError, r"^unknown config field --config\.loss\.nope$"),
    ("--config.train.step=3", ValueError, r"--config\.train\.step; did you mean train\.steps\?"),
    ("--config.foo.bar=1", ValueError, r"^unknown config field --config\.foo\.bar$"),
    ("--config.train=1", ValueError, r"^unknown config field --config\.train$"),
    ("--config.train.steps=ten", ValueError, r"--config\.train\.steps: cannot parse 'ten'"),
    ("--config.loss.recon_real_only=maybe", ValueError, r"--config\.loss\.recon_real_only "),
    ("--steps=1", ValueError, r"'--steps=1'"),
])
def test_bad_overrides_are_named(item, error, named):
    with pytest.raises(error, match=named):
        config_lib.load_config("configs/tiny.py", [item])


@pytest.mark.parametrize("item, named", [
    ("--config.train.eval_every=0", r"train\.eval_every=0 \(must be an integer >= 1\)"),
    ("--config.train.checkpoint_every=-5", r"train\.checkpoint_every=-5 "),
    ("--config.train.log_every=0", r"train\.log_every=0 "),
    ("--config.train.batch_size=0", r"train\.batch_size=0 "),
    ("--config.train.steps=0", r"train\.steps=0 "),
    ("--config.train.keep_checkpoints=0", r"train\.keep_checkpoints=0 "),
    ("--config.train.nan_policy=ignore", r"train\.nan_policy='ignore' \(must be one of 'stop'"),
    ("--config.optim.learning_rate=-0.1", r"optim\.learning_rate=-0\.1 "),
    ("--config.optim.b2=1.0", r"optim\.b2=1\.0 \(must be a number in \[0\.0, 1\.0\)\)"),
    ("--config.input.threads=0", r"input\.threads=0 "),
    ("--config.input.augment.jpeg_quality=(90,40)", r"input\.augment\.jpeg_quality="),
    ("--config.input.sbi.prob=1.5", r"input\.sbi\.prob=1\.5 "),
    ("--config.model.encoder.entry_features=(8,16)", r"model\.encoder\.entry_features="),
    ("--config.model.dtype=float16", r"model\.dtype='float16' "),
    ("--config.mesh.data=0", r"mesh\.data=0 \(must be -1 or an integer >= 1\)"),
    ("--config.model.layer_impl=shifted", r"model\.layer_impl='shifted' \(must be one of 'auto', "
                                          r"'decomposed', 'native'\)"),
    ("--config.input.augment.on_device=maybe", r"input\.augment\.on_device='maybe' "),
    ("--config.loss.recon=l2", r"loss\.recon='l2' "),
    ("--config.model.decoder.output_activation=relu", r"output_activation='relu' "),
    ("--config.model.pool_padding=valid", r"model\.pool_padding='valid' "),
    ("--config.model.image_size=2", r"model\.image_size=2 \(must be an integer >= 7 for "
                                    r"xception: a smaller input leaves it no latent\)"),
    ("--config.model.image_size=0", r"model\.image_size=0 \(must be an integer >= 1\)$"),
])
def test_values_no_run_can_use_are_refused_at_load_naming_the_field(item, named):
    with pytest.raises(ValueError, match=named):
        config_lib.load_config("configs/tiny.py", [item])


def test_validation_names_every_bad_field_and_passes_the_shipped_configs():
    from pathlib import Path

    for path in sorted(Path("configs").glob("*.py")):
        config_lib.load_config(path)  # Each shipped config is valid.
    config = config_lib.default_config()
    config.train.eval_every = 0
    config.train.log_every = True  # A bool is no step count.
    with pytest.raises(ValueError) as err:
        config_lib.validate(config)
    assert "train.eval_every=0" in str(err.value) and "train.log_every=True" in str(err.value)


def test_cli_refuses_a_bad_config_without_a_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path / "run"), "--config.train.eval_every=0"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: invalid config: train.eval_every=0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item, message", [
    ("--config.train.step=3", "error: unknown config field --config.train.step; "
                              "did you mean train.steps?"),
    ("--config.foo.bar=1", "error: unknown config field --config.foo.bar"),
])
def test_cli_refuses_an_unknown_field_in_one_line(tmp_path, item, message):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cae_jax.main", "train", "--config", "configs/tiny.py",
         "--workdir", str(tmp_path / "run"), item],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_saved_config_merges_onto_the_defaults(caplog):
    saved = config_lib.default_config().to_dict()
    del saved["train"]["steps"], saved["input"]["sbi"]
    saved["model"]["encoder"]["entry_features"] = [8, 8, 16]  # JSON has lists.
    saved["model"]["gone"] = 1
    config = config_lib.from_saved(saved, "old.json")
    assert config.model.encoder.entry_features == (8, 8, 16)
    assert config.train.steps == 20_000 and config.input.sbi.prob == 0.0
    assert "old.json: written before fields input.sbi.prob, train.steps existed" in caplog.text
    assert "old.json: fields model.gone are no longer used" in caplog.text
    assert "gone" not in config.model
    with pytest.raises(ValueError, match="model.encoder is not a group of fields"):
        config_lib.from_saved({"model": {"encoder": 3}}, "bad.json")
    with pytest.raises(ValueError, match="model.image_size is a field, not a group"):
        config_lib.from_saved({"model": {"image_size": {"a": 1}}}, "bad.json")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_lib.load_config(tmp_path / "nope.py")


def test_readme_documents_every_config_field():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()

    def fields(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, config_lib.ConfigDict):
                yield from fields(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    missing = [f for f in fields(config_lib.default_config()) if f"| `{f}` |" not in readme]
    assert not missing


@pytest.mark.parametrize("config_file, overrides, sizes, minimum", [
    ("configs/tiny.py", ["--config.model.pool_padding=torch"], (5, 6, 7, 8, 9, 13, 64, 299), 7),
    ("configs/tiny.py", ["--config.model.pool_padding=same"], (6, 7, 8, 9, 13, 64, 299), 7),
    ("configs/tiny_effb4.py", [], (1, 2, 3, 31, 32, 33, 64, 380), 1),
    # B4's own widths and depths at DeepfakeBench's 256 and the paper's 299.
    ("configs/tiny_effb4.py", ["--config.model.encoder.width_multiplier=1.4",
                               "--config.model.encoder.depth_multiplier=1.8"], (256, 299), 1),
])
def test_latent_size_is_the_encoders_output_and_the_smallest_image_size_runs(
        config_file, overrides, sizes, minimum):
    import jax
    import jax.numpy as jnp

    from cae_jax import backbones, models

    config = config_lib.load_config(config_file, overrides)
    module = backbones.backbone(config.model)
    for size in sizes:
        config.model.image_size = size
        encoder = models.build_model(config.model).encoder
        shape = jax.eval_shape(lambda x, encoder=encoder: encoder(x, train=False),
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape
        assert shape[1:3] == (module.latent_size(config.model.encoder, size),) * 2, size
    assert backbones.min_image_size(config.model) == minimum
    assert module.latent_size(config.model.encoder, minimum) == 1
    assert minimum == 1 or module.latent_size(config.model.encoder, minimum - 1) == 0
    if minimum > 1:  # Refused in one line naming the field, the minimum and the encoder.
        with pytest.raises(ValueError, match=rf"^invalid config: model\.image_size={minimum - 1} "
                           rf"\(must be an integer >= {minimum} for {module.NAME}: "):
            config_lib.load_config(config_file, [*overrides,
                                                 f"--config.model.image_size={minimum - 1}"])
