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


@pytest.mark.parametrize("item, error", [
    ("--config.loss.nope=1", KeyError),
    ("--config.train.steps=ten", ValueError),
    ("--config.loss.recon_real_only=maybe", ValueError),
    ("--steps=1", ValueError),
])
def test_bad_overrides_are_named(item, error):
    with pytest.raises(error):
        config_lib.load_config("configs/tiny.py", [item])


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
