"""On-device augmentation: the host's choices applied in the train step as the host would."""

import shutil
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cae_jax import augment, checkpoints, device_augment, input_pipeline, sharding, train
from cae_jax import train_step as train_step_lib
from cae_jax.config import default_config, load_config
from tests import datasets

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
DRAWS = 3000


def config_with(on_device: str, **augment_fields):
    config = default_config()
    config.model.image_size = SIZE
    config.input.augment.on_device = on_device
    config.input.augment.update(augment_fields)
    return config


ONLY_RESIZE = {"resize_prob": 1.0, "flip_prob": 0.0, "blur_prob": 0.0,
               "brightness_contrast_prob": 0.0, "jpeg_prob": 0.0}


def crop(index: int, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """`datasets.face_crop(index, SIZE)` at the default shape; any height and width."""
    return cv2.resize(datasets.face_crop(index, 128), shape[::-1], interpolation=cv2.INTER_AREA)


def record(index: int, shape: tuple[int, int] = (SIZE, SIZE), label: int = 1) -> dict:
    png = cv2.imencode(".png", cv2.cvtColor(crop(index, shape), cv2.COLOR_RGB2BGR))[1]
    return {"png": png.tobytes(), "label": label, "path": "mem", "offset": index}


def examples(config, seeds, shape=(SIZE, SIZE), label=1) -> list[dict]:
    on = augment.on_device(config.input.augment, "cpu")
    transform = input_pipeline.TrainTransform(config, dataset_id=0, on_device=on)
    return [transform.random_map(record(s % 7, shape, label), np.random.default_rng(s))
            for s in seeds]


def choices(size: int = SIZE, **overrides) -> dict:
    """`param_fields` of an image at `size` that the device leaves as it is, but `overrides`."""
    return device_augment.param_fields(
        {"height": size, "width": size, "resized_height": size, "resized_width": size,
         "cubic": True, "flip": False, "blur_kernel": 0, "alpha": 1.0, "beta": 0.0, **overrides})


def on_device(examples_: list[dict]) -> np.ndarray:
    """The device's augmentation of the host's on-device examples, as uint8."""
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples_])) for k in examples_[0]}
    out = jax.jit(device_augment.augment_batch, static_argnums=1)(batch, 7)
    return np.asarray(out).astype(np.uint8)


def test_on_by_default_on_gpu_and_tpu_only():
    cfg = default_config().input.augment
    assert cfg.on_device == "auto"
    assert [augment.on_device(cfg, b) for b in ("cpu", "gpu", "tpu")] == [False, True, True]
    cfg.on_device = "on"
    assert augment.on_device(cfg, "cpu")
    with pytest.raises(ValueError, match=r"input\.augment\.on_device='yes' \(must be one of "
                       r"'auto', 'on', 'off'\)"):  # Refused where every field is: config.RULES.
        load_config("configs/tiny.py", ["--config.input.augment.on_device=yes"])


def test_default_on_cpu_keeps_augmenting_on_the_host():
    (example,) = examples(config_with("auto"), [0])
    assert jax.default_backend() == "cpu" and sorted(example) == ["dataset_id", "image", "label"]


def test_train_iterator_sends_uint8_images_and_the_choices(tmp_path):
    data_dir = datasets.write(tmp_path / "toy", {"train": (4, 4)}, size=SIZE)
    config = config_with("on")
    config.train.batch_size = 8
    mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
    iterator = input_pipeline.make_train_iterator(config, mesh, [str(data_dir)])
    batch = next(iterator)
    iterator.close()
    assert batch["image"].dtype == jnp.uint8 and batch["image"].shape == (8, SIZE, SIZE, 3)
    for name, dtype in device_augment.PARAM_DTYPES.items():
        assert batch[f"aug_{name}"].dtype == dtype and batch[f"aug_{name}"].shape == (8,)


def test_on_device_draws_the_configured_operations_and_ranges():
    fields = examples(config_with("on", jpeg_prob=0.0), range(DRAWS))
    flip = np.array([e["aug_flip"] for e in fields])
    kernel = np.array([e["aug_blur_kernel"] for e in fields])
    alpha = np.array([e["aug_alpha"] for e in fields])
    beta = np.array([e["aug_beta"] for e in fields])
    bound = 4 * np.sqrt(0.25 / DRAWS)  # Four binomial standard deviations at p = 0.5.
    for drawn in (flip, kernel > 0, alpha != 1.0):
        assert abs(drawn.mean() - 0.5) < bound
    for k in (3, 5, 7):  # Blur sizes uniform over the odd sizes of (3, 7).
        assert abs(np.mean(kernel[kernel > 0] == k) - 1 / 3) < 4 * np.sqrt(2 / 9 / (DRAWS / 2))
    assert set(np.unique(kernel)) == {0, 3, 5, 7}
    adjusted = alpha != 1.0
    assert 0.9 <= alpha[adjusted].min() < 0.91 and 1.09 < alpha[adjusted].max() <= 1.1
    assert -25.5 <= beta[adjusted].min() < -24 and 24 < beta[adjusted].max() <= 25.5
    assert np.all(beta[~adjusted] == 0.0)


def test_device_applies_each_example_as_the_host_would():
    """Same seeds: host augmentation vs host-drawn choices applied on the device (no JPEG)."""
    seeds = range(300)
    host = examples(config_with("off", jpeg_prob=0.0), seeds)
    device = on_device(examples(config_with("on", jpeg_prob=0.0), seeds))
    diffs = [np.abs(d.astype(int) - h["image"]).max() for d, h in zip(device, host, strict=True)]
    assert max(diffs) <= 2  # Rounding: OpenCV's fixed-point blur vs float, a LUT vs float32.
    assert np.mean(np.array(diffs) == 0) > 0.4
    changed = [not np.array_equal(h["image"], datasets.face_crop(s % 7, SIZE))
               for s, h in zip(seeds, host, strict=True)]
    assert np.mean(changed) > 0.8  # The comparison covers augmented images, not identities.


def test_jpeg_stays_on_the_host_with_the_same_draws():
    only_jpeg = {"flip_prob": 0.0, "blur_prob": 0.0, "brightness_contrast_prob": 0.0,
                 "jpeg_prob": 0.5}
    host = examples(config_with("off", **only_jpeg), range(40))
    device = examples(config_with("on", **only_jpeg), range(40))
    for h, d in zip(host, device, strict=True):
        np.testing.assert_array_equal(h["image"], d["image"])
    recompressed = [not np.array_equal(h["image"], datasets.face_crop(s % 7, SIZE))
                    for s, h in enumerate(host)]
    assert 0.2 < np.mean(recompressed) < 0.8


def test_device_flip_is_exactly_a_mirror():
    fields = examples(config_with("on", flip_prob=1.0, blur_prob=0.0, brightness_contrast_prob=0.0,
                                  jpeg_prob=0.0), range(4))
    for example, out in zip(fields, on_device(fields), strict=True):
        np.testing.assert_array_equal(out, np.flip(example["image"], axis=1))


def test_device_blur_and_brightness_match_opencv():
    image = datasets.face_crop(3, SIZE)
    for k in (3, 5, 7):
        example = {"image": image, **choices(blur_kernel=k)}
        diff = on_device([example])[0].astype(int) - augment.blur(image, k)
        assert np.abs(diff).max() <= 1 and np.mean(diff == 0) > 0.95
    example = {"image": image, **choices(alpha=1.07, beta=-12.3)}
    diff = on_device([example])[0].astype(int) - augment.scale_shift(image, 1.07, -12.3)
    # Off by one only where x * alpha + beta is a half in float64 but not in float32.
    assert np.abs(diff).max() <= 1 and np.mean(diff == 0) > 0.99


@pytest.mark.parametrize("shape", [(20, 20), (24, 17), (13, 30), (32, 32), (32, 21), (45, 45),
                                   (40, 27)])
def test_device_resize_matches_the_hosts(shape):
    """Crops no larger than the model's input are resized on the device (bicubic or bilinear
    as drawn), larger ones arrive downscaled by the host; either way `random_resize`'s image."""
    seeds = range(30)
    host = np.stack([e["image"] for e in examples(config_with("off", **ONLY_RESIZE), seeds, shape)])
    fields = examples(config_with("on", **ONLY_RESIZE), seeds, shape)
    diff = np.abs(on_device(fields).astype(int) - host)
    cubic = np.array([e["aug_cubic"] for e in fields])
    assert 0 < cubic.mean() < 1  # Both kernels drawn.
    sent = shape if max(shape) <= SIZE else (SIZE, SIZE)
    assert all((e["aug_height"], e["aug_width"]) == sent for e in fields)
    if max(shape) >= SIZE:  # Nothing to upscale: the device passes the pixels unchanged.
        assert diff.max() == 0
    else:
        # Measured: bicubic exact (OpenCV's rounded fixed point, float32 Keys a = -0.75 here;
        # on noisy images off by one on 0.2% of pixels);
        # bilinear off by one on 5-11% of pixels (OpenCV's bilinear truncates its fixed point).
        assert diff[cubic].max() == 0
        assert diff[~cubic].max() == 1 and diff[~cubic].mean() < 0.12


def test_canvas_beyond_the_crop_does_not_bleed_into_the_upscale():
    canvas, resize = device_augment.place(crop(1, (20, 13)), SIZE)
    dirty = canvas.copy()
    dirty[20:], dirty[:, 13:] = 255, 255
    for cubic in (True, False):
        fields = choices(**resize | {"cubic": cubic})
        clean, smudged = on_device([{"image": canvas, **fields}, {"image": dirty, **fields}])
        np.testing.assert_array_equal(clean, smudged)


def blended_small_crops(mode: str, jpeg_prob: float) -> tuple[list[dict], list[float]]:
    """20x26 real faces, half self-blended, through `TrainTransform`; and the next draw of each
    record's generator after it."""
    config = config_with(mode, resize_prob=0.5, jpeg_prob=jpeg_prob)
    config.input.sbi.prob = 0.5
    transform = input_pipeline.TrainTransform(config, 0, on_device=mode == "on")
    rngs = [np.random.default_rng(s) for s in range(60)]
    out = [transform.random_map(record(s % 7, (20, 26), label=0), rng)
           for s, rng in enumerate(rngs)]
    return out, [rng.random() for rng in rngs]


def test_on_device_resize_keeps_every_draw_of_the_host_path():
    """The interpolation pair and every later draw are the host path's: the generators end in
    the same state, and (without JPEG, which then comes before the upscale) the device yields
    the host's images. Self-blended faces are resized on the host, where the mask is placed."""
    for jpeg_prob in (0.5, 0.0):
        assert blended_small_crops("on", jpeg_prob)[1] == blended_small_crops("off", jpeg_prob)[1]
    host, device = blended_small_crops("off", 0.0)[0], blended_small_crops("on", 0.0)[0]
    blended = np.array([e["label"] == 1 for e in device])
    assert [e["label"] for e in host] == [e["label"] for e in device]
    assert 0.3 < blended.mean() < 0.7
    assert np.array_equal([e["aug_height"] < SIZE for e in device], ~blended)
    cubic = np.array([e["aug_cubic"] for e in device])
    assert 0.5 < cubic.mean() < 1  # resize_prob 0.5: the default pair (cubic) or a drawn one.
    diff = np.abs(on_device(device).astype(int) - np.stack([e["image"] for e in host]))
    # Measured: at most 2 (the upscale's and the blur's rounding), mean 0.017.
    assert diff.max() <= 2 and diff.mean() < 0.02


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_device_augmentation_lowers_for_accelerators_without_custom_calls(platform):
    batch = {"image": jax.ShapeDtypeStruct((4, 299, 299, 3), jnp.uint8),
             **{f"aug_{k}": jax.ShapeDtypeStruct((4,), v)
                for k, v in device_augment.PARAM_DTYPES.items()}}
    lowered = jax.jit(device_augment.augment_batch, static_argnums=1).trace(batch, 7).lower(
        lowering_platforms=(platform,))
    assert "custom_call" not in lowered.as_text()


def test_train_step_augments_on_device_before_the_model():
    """A step on uint8 images with every flip drawn equals a host-flipped step."""
    config = load_config(ROOT / "configs" / "tiny.py")
    mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
    images = np.stack([datasets.face_crop(i, 64) for i in range(8)])
    labels = jnp.asarray(np.arange(8) % 2, jnp.int32)
    results = []
    for mode, batch in (
        ("off", {"image": jnp.asarray(images[:, :, ::-1]), "label": labels}),
        ("on", {"image": jnp.asarray(images), "label": labels, **{
            k: jnp.asarray(np.stack([v] * 8)) for k, v in choices(64, flip=True).items()}}),
    ):
        config.input.augment.on_device = mode
        abstract = train_step_lib.abstract_state(config, mesh)
        step = train_step_lib.make_train_step(config, abstract)
        state, metrics = step(train_step_lib.create_train_state(config, abstract), batch)
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    # The same computation up to XLA's fusion of the normalization (float32 rounding).
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[0][0], results[1][0])


def params_at(workdir: Path, step: int) -> list[np.ndarray]:
    _, params, stats, _ = checkpoints.restore_inference(workdir / "checkpoints" / str(step))
    return [np.asarray(x) for x in jax.tree.leaves((params, stats))]


def test_resume_with_on_device_augmentation_is_exact(tmp_path):
    data_dir = datasets.write(tmp_path / "toy", {"train": (8, 8)})
    config = load_config(ROOT / "configs" / "tiny.py", [
        f"--config.input.train_dirs=('{data_dir}',)", "--config.input.augment.on_device=on",
        "--config.train.steps=4", "--config.train.checkpoint_every=2"])
    straight = tmp_path / "straight"
    train.train(config, straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")  # As if stopped right after step 2's save.
    train.train(config, resumed)
    for got, want in zip(params_at(resumed, 4), params_at(straight, 4), strict=True):
        np.testing.assert_array_equal(got, want)
