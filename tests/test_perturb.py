"""Test-time perturbations: the specs, pixel-level effects, determinism per face, the training
augmentations' own code, and AUC at the mildest severity through the eval stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import augment, evaluate, metrics, perturb, pixels, sharding
from cae_jax import main as cli
from tests import datasets

RECORD = {"dataset": "toy", "method": "real", "video_id": "a.mp4", "frame_index": 3}
MILDEST = ["jpeg:95", "resize:0.9", "blur:3", "noise:1"]
HARSHEST = ["jpeg:5", "resize:0.1", "blur:15", "noise:60"]


def crop():
    return datasets.face_crop(0, size=128)


def mean_abs_diff(a, b):
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def test_parse_keeps_order_and_names():
    parsed = perturb.parse(["jpeg:90,50", "resize:0.5", "blur:3,7", "noise:5"])
    assert [p.name for p in parsed] == ["jpeg:90", "jpeg:50", "resize:0.5", "blur:3", "blur:7",
                                       "noise:5"]


@pytest.mark.parametrize("spec, message", [
    ("jpeg:0", "jpeg severity '0' must be an integer quality in 1..100"),
    ("jpeg:50.5", "must be an integer quality"),
    ("resize:1.5", "resize severity '1.5' must be a scale factor in (0, 1)"),
    ("blur:4", "must be an odd kernel size >= 3"),
    ("noise:x", "noise severity 'x' must be a standard deviation > 0"),
    ("sharpen:2", "expected KIND:S1,S2,... with KIND one of jpeg, resize, blur, noise"),
    ("jpeg", "expected KIND:S1,S2,..."),
    ("jpeg:90,90", "jpeg:90 is given twice"),
])
def test_bad_specs_are_one_line_errors_naming_the_flag(tmp_path, spec, message):
    with pytest.raises(SystemExit) as err:
        cli.main(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path),
                  "--out", str(tmp_path / "m.json"), "--perturb", spec])
    text = str(err.value)
    assert text.startswith(f"error: --perturb {spec!r}: ") and message in text
    assert "\n" not in text


@pytest.mark.parametrize("spec", HARSHEST)
def test_harshest_severity_changes_the_crop(spec):
    (p,) = perturb.parse([spec])
    image = crop()
    out = perturb.apply(image, p, RECORD)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mean_abs_diff(out, image) > 8.0
    if p.kind in ("resize", "blur"):  # Detail is gone: far less high-frequency energy.
        def detail(x):
            return np.abs(np.diff(x.astype(np.float32), axis=1)).mean()
        assert detail(out) < 0.6 * detail(image)


@pytest.mark.parametrize("spec", MILDEST)
def test_mildest_severity_barely_changes_the_crop(spec):
    (p,) = perturb.parse([spec])
    image = crop()
    out = perturb.apply(image, p, RECORD)
    assert 0 < mean_abs_diff(out, image) < 4.0


def test_jpeg_and_blur_are_the_training_augmentations():
    image = crop()
    jpeg, blur = perturb.parse(["jpeg:40", "blur:5"])
    np.testing.assert_array_equal(perturb.apply(image, jpeg, RECORD), augment.jpeg(image, 40))
    np.testing.assert_array_equal(perturb.apply(image, blur, RECORD), augment.blur(image, 5))


def test_noise_is_deterministic_per_face():
    (p,) = perturb.parse(["noise:10"])
    image = crop()
    first = perturb.apply(image, p, RECORD)
    np.testing.assert_array_equal(perturb.apply(image, p, dict(RECORD)), first)
    other = perturb.apply(image, p, {**RECORD, "frame_index": 4})
    assert not np.array_equal(other, first)


def test_mildest_severity_keeps_auc(tmp_path):
    """Through the eval stream, scoring each face by a fixed statistic of its pixels."""
    from tests.test_export import tiny_config

    config = tiny_config()
    data = datasets.write(tmp_path / "toy", {"test": (24, 24)}, num_shards=1, size=96)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())

    @jax.jit
    def eval_step(state, batch):
        del state
        top_left = pixels.normalize(batch["image"][:, :32, :32]).mean(axis=(1, 2, 3))  # AUC 0.69.
        return {"prob": jax.nn.sigmoid(4 * top_left), "recon_error": jnp.zeros_like(top_left)}

    def auc(p=None):
        scores = evaluate.score_split(config, eval_step, None, mesh, str(data), "test",
                                      progress=False, perturbation=p)
        return metrics.auc(scores["label"], scores["prob"]), scores["prob"]

    clean, clean_probs = auc()
    assert 0.6 < clean < 1.0
    for p in perturb.parse(MILDEST):
        mild, probs = auc(p)
        assert abs(mild - clean) < 0.03, p.name
        assert not np.array_equal(probs, clean_probs)  # The crops did change.
