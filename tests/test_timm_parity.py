"""timm `legacy_xception` weights imported into our encoder give timm's features at 299x299.

The reference is `torch_peer.LegacyXception`, timm's module written in plain torch (timm
itself needs torchvision, and PyPI's does not load beside the pinned CPU torch); where timm does
import, the last test checks that module against timm's own.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from cae_jax import config as config_lib
from cae_jax import main, models, sharding, train_step

# The `bench` extra; the newest stack leaves it out (README, "Install").
torch = pytest.importorskip("torch")
import safetensors.torch as safetensors_torch  # noqa: E402

from cae_jax.bench.torch_peer import LegacyXception  # noqa: E402
from tests.torch_helpers import randomize_batch_norm  # noqa: E402


def test_timm_import_gives_timm_features(tmp_path):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = LegacyXception().eval()
    randomize_batch_norm(model, generator)
    assert sum(p.numel() for p in model.parameters()) == 20_806_952
    weights = tmp_path / "legacy_xception.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(weights))
    out = tmp_path / "imported"
    assert main.main(["import-weights", "--format", "timm", "--input", str(weights),
                      "--output", str(out)]) == 0

    config = config_lib.default_config()
    config.init_from = str(out)
    config.model.pool_padding = "torch"
    config.model.bn_epsilon = 1e-5
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    state = train_step.create_train_state(config, train_step.abstract_state(config, mesh))
    graphdef, _, _ = models.abstract_model(config.model)

    images = np.random.default_rng(1).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)

    @jax.jit
    def encode(params, batch_stats, x):
        return nnx.merge(graphdef, params, batch_stats, copy=True).encoder(x, train=False)

    ours = np.asarray(encode(state.params, state.batch_stats, images))
    with torch.inference_mode():
        theirs = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (2, 10, 10, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_plain_torch_module_is_timms():
    try:
        import timm
    except (ImportError, RuntimeError) as err:  # A torchvision built for another torch.
        pytest.skip(f"timm does not import here (it needs torchvision): {err}")
    torch.manual_seed(0)
    theirs = timm.create_model("legacy_xception", pretrained=False, num_classes=0).eval()
    randomize_batch_norm(theirs, torch.Generator().manual_seed(0))
    state = theirs.state_dict()
    ours = LegacyXception().eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in state.items()}
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x),
                                   rtol=0, atol=0)
