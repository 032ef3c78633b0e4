"""Train-step and inference rows on the CPU: cae-jax beside the PyTorch peer, taking turns."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cae_jax import augment, device_augment, models, serving, sharding, train_step
from cae_jax.bench import timing


def random_batch(config: ConfigDict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(config.seed)
    size = config.model.image_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return images, (np.arange(batch) % 2).astype(np.int32)


def train_batch(config: ConfigDict, images: np.ndarray, labels: np.ndarray) -> dict:
    """The train step's batch: uint8 images, with `input.augment.on_device` (the default on
    GPU/TPU) and augmentation choices drawn as the pipeline draws them, so the timed step
    includes the on-device augmentation."""
    if not augment.on_device(config.input.augment, jax.default_backend()):
        return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    rng, size = np.random.default_rng(config.seed), config.model.image_size
    draws = [device_augment.param_fields({**augment.draw(rng, config.input.augment),
                                          **device_augment.place(image, size)[1]})
             for image in images]
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels),
            **{k: jnp.asarray(np.stack([d[k] for d in draws])) for k in draws[0]}}


def train_jax(config: ConfigDict) -> tuple[Callable[[], object], dict]:
    """One full CAE train step (encoder, decoder, classifier, AdamW) on a 1-device mesh.

    Returns the step as a callable and its compile seconds and GFLOP.
    """
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    abstract = train_step.abstract_state(config, mesh)
    state = train_step.create_train_state(config, abstract)
    step = train_step.make_train_step(config, abstract)
    images, labels = random_batch(config, config.train.batch_size)
    batch = train_batch(config, images, labels)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batch)
        jax.block_until_ready(metrics)

    return run, {"compile_s": compile_s, "gflop": timing.gflops(compiled)}


def infer_jax(config: ConfigDict, batch: int) -> tuple[Callable[[], object], dict]:
    """The exported "classify" serving function (uint8 in, probability out), jitted as
    `load_bundle`'s Predictor runs it."""
    model = models.build_model(config.model, config.seed)
    graphdef, params, batch_stats = models.split_model(model)
    serving_fn = serving.serving_fns(graphdef)["classify"]
    images = jnp.asarray(random_batch(config, batch)[0])
    weights = (params, batch_stats)
    start = time.perf_counter()
    compiled = serving.jit_serving(serving_fn).lower(weights, images).compile()
    compile_s = time.perf_counter() - start
    # Counted on the whole batch in one program: XLA counts the CPU chunk loop's body once.
    gflop = timing.gflops(jax.jit(serving_fn).lower(weights, images).compile())
    return (lambda: jax.block_until_ready(compiled(weights, images)),
            {"compile_s": compile_s, "gflop": gflop})


def torch_reason(config: ConfigDict) -> str:
    """Why the PyTorch peer cannot run here ("" when it can)."""
    if not importlib.util.find_spec("torch"):
        return "torch not installed (pip install 'cae-jax[bench]')"
    from cae_jax.bench import torch_peer

    return torch_peer.unsupported_reason(config.model)


def _torch_images(config: ConfigDict, batch: int):
    import torch

    images, labels = random_batch(config, batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    return x, torch.from_numpy(labels).float()


def train_torch(config: ConfigDict) -> Callable[[], object]:
    import torch

    from cae_jax.bench import torch_peer

    torch.set_num_threads(timing.cores())
    torch.manual_seed(config.seed)
    model = torch_peer.TorchCAE(config.model)
    step = torch_peer.make_train_step(config, model)
    x, y = _torch_images(config, config.train.batch_size)
    return lambda: step(x, y)


def infer_torch(config: ConfigDict, batch: int) -> Callable[[], object]:
    import torch

    from cae_jax.bench import torch_peer

    torch.set_num_threads(timing.cores())
    model = torch_peer.TorchCAE(config.model).eval()
    images = torch.from_numpy(random_batch(config, batch)[0])

    def run():
        with torch.inference_mode():
            x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            return torch.sigmoid(model.classify(x)).numpy()

    return run


def against_peer(ours: tuple[Callable[[], object], dict], peer: Callable[[], object] | None,
                 images: int, repeats: int) -> tuple[dict, dict | None]:
    """Times cae-jax and the peer (None: no peer) taking turns; images/s and GFLOP/s."""
    run, info = ours
    seconds = timing.interleaved_medians({"ours": run, **({"peer": peer} if peer else {})},
                                         repeats)
    result = {"seconds": seconds["ours"], "images_per_s": images / seconds["ours"], **info,
              "gflops_per_s": info["gflop"] / seconds["ours"]}
    if not peer:
        return result, None
    return result, {"seconds": seconds["peer"], "images_per_s": images / seconds["peer"]}


def train_row(config: ConfigDict, repeats: int, with_peer: bool) -> tuple[dict, dict | None]:
    return against_peer(train_jax(config), train_torch(config) if with_peer else None,
                        config.train.batch_size, repeats)


def inference_row(config: ConfigDict, batch: int, repeats: int, with_peer: bool
                  ) -> tuple[dict, dict | None]:
    return against_peer(infer_jax(config, batch), infer_torch(config, batch) if with_peer
                        else None, batch, repeats)
