"""`cae-jax bench`: speed of training, inference, input pipeline and face extraction, each beside
a peer measured in the same run on the same machine.

Peers: PyTorch eager with timm's `legacy_xception` plus the same decoder and classifier (the
`bench` extra; "n/a" without it), tf.data for the input pipeline, dlib's HOG detector for
`prepare` (the `dlib` extra). Times are medians over repeats (train and inference: cae-jax and
PyTorch taking turns, repeat by repeat, each of these rows in a fresh process); compile time is
reported apart. The peer's `legacy_xception` is timm's module written in plain torch
(`torch_peer.LegacyXception`: timm needs torchvision, absent beside the pinned CPU torch).
GFLOP/s come from XLA's cost analysis, beside a measured large float32 matmul (the peak).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cae_jax import augment, device_augment, export, host_memory, models, ops, sharding, train_step
from cae_jax import config as config_lib

ACCEPTS_CONFIG_OVERRIDES = True
TINY_CONFIG = config_lib.shipped_config("tiny")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
                        ) -> dict[str, float]:
    """Median wall time of each `fn()`, the functions taking turns repeat by repeat.

    Alternating keeps a change in the machine's load (a shared VM) from landing on one side
    of a ratio only. Each function first runs `warmup` untimed calls.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def log(message: str) -> None:
    """Progress on stderr: a full run takes many minutes and prints its table only at the end."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cores": cores(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "load_average": list(os.getloadavg()),
    }
    if importlib.util.find_spec("torch"):
        import torch

        info["torch"] = torch.__version__
    return info


def gflops(compiled) -> float:
    """Floating-point operations of one call of a compiled function, from XLA, in GFLOP."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) / 1e9


def matmul_peak(n: int, repeats: int) -> dict:
    """GFLOP/s of an n x n float32 matmul: the machine's practical peak for the ratios below."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, a).block_until_ready(), repeats)
    return {"size": n, "seconds": seconds, "gflops_per_s": 2 * n**3 / seconds / 1e9}


def conv_by_impl(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
    """A stride-1 "VALID" conv in the form an nnx.Conv of its shape runs."""
    size, _, in_features, out_features = kernel.shape
    conv = ops.conv_fn(impl, in_features, out_features, size, 1)
    return conv(x, kernel, (1, 1), "VALID", dimension_numbers=ops.native.DIMS)


def layer_cases(scale: int) -> list[tuple[str, list[tuple[int, ...]], Callable]]:
    """Layers of the full-size CAE at batch 8: (name, argument shapes, fn(*args, impl)).

    `scale` divides spatial sizes and widths (smoke runs).
    """
    c32, c64, c128, c256, c512, c728, c2048 = (
        c // scale for c in (32, 64, 128, 256, 512, 728, 2048))
    s10, s37, s74, s147, s149 = (max(s // scale, 1) for s in (10, 37, 74, 147, 149))
    return [
        ("depthwise 3x3", [(8, s37, s37, c728), (3, 3, 1, c728)], ops.depthwise_conv3x3),
        ("pointwise 1x1 conv", [(8, s74, s74, c128), (1, 1, c128, c256)], conv_by_impl),
        ("3x3 conv (stem conv2)", [(8, s149, s149, c32), (3, 3, c32, c64)], conv_by_impl),
        ("transposed conv 4x4/2", [(8, s10, s10, c2048), (4, 4, c2048, c512)],
         lambda x, k, impl: ops.conv_transpose(x, k, 2, impl)),
        ("max-pool 3x3/2", [(8, s147, s147, c128)],
         lambda x, impl: ops.max_pool3x3(x, 2, "torch", impl)),
    ]


def layer_impls(scale: int, repeats: int) -> list[dict]:
    """Forward and gradient (all inputs) seconds per layer, native vs decomposed."""
    results = []
    for name, shapes, fn in layer_cases(scale):
        args = [jax.random.normal(jax.random.key(i), s) * 0.05 for i, s in enumerate(shapes)]
        result = {"layer": name, "shapes": [list(s) for s in shapes]}
        for impl in ("native", "decomposed"):
            fwd = jax.jit(lambda *a, impl=impl, fn=fn: fn(*a, impl))
            grad = jax.jit(jax.grad(lambda *a, impl=impl, fn=fn: jnp.sum(fn(*a, impl) ** 2),
                                    argnums=tuple(range(len(args)))))
            result[impl] = {
                "forward_s": median_seconds(
                    lambda f=fwd, a=args: jax.block_until_ready(f(*a)), repeats),
                "gradient_s": median_seconds(
                    lambda g=grad, a=args: jax.block_until_ready(g(*a)), repeats),
            }
        results.append(result)
    return results


def random_batch(config: ConfigDict, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(config.seed)
    size = config.model.image_size
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return images, (np.arange(batch) % 2).astype(np.int32)


def train_batch(config: ConfigDict, images: np.ndarray, labels: np.ndarray) -> dict:
    """The train step's batch: normalized images, or with `input.augment.on_device` (the
    default on GPU/TPU) uint8 images and augmentation choices drawn as the pipeline draws
    them, so the timed step includes the on-device augmentation."""
    if not augment.on_device(config.input.augment, jax.default_backend()):
        return {"image": models.normalize(jnp.asarray(images)), "label": jnp.asarray(labels)}
    rng = np.random.default_rng(config.seed)
    draws = [device_augment.param_fields(augment.draw(rng, config.input.augment))
             for _ in images]
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

    return run, {"compile_s": compile_s, "gflop": gflops(compiled)}


def infer_jax(config: ConfigDict, batch: int) -> tuple[Callable[[], object], dict]:
    """The exported "classify" serving function (uint8 in, probability out), jitted as
    `load_bundle`'s Predictor runs it."""
    model = models.build_model(config.model, config.seed)
    graphdef, params, batch_stats = train_step.split_model(model)
    serving_fn = export.serving_fns(graphdef)["classify"]
    images = jnp.asarray(random_batch(config, batch)[0])
    weights = (params, batch_stats)
    start = time.perf_counter()
    compiled = export.jit_serving(serving_fn).lower(weights, images).compile()
    compile_s = time.perf_counter() - start
    # Counted on the whole batch in one program: XLA counts the CPU chunk loop's body once.
    gflop = gflops(jax.jit(serving_fn).lower(weights, images).compile())
    return (lambda: jax.block_until_ready(compiled(weights, images)),
            {"compile_s": compile_s, "gflop": gflop})


def torch_reason(config: ConfigDict) -> str:
    """Why the PyTorch peer cannot run here ("" when it can)."""
    if not importlib.util.find_spec("torch"):
        return "torch not installed (pip install 'cae-jax[bench]')"
    from cae_jax import torch_peer

    return torch_peer.unsupported_reason(config.model)


def _torch_images(config: ConfigDict, batch: int):
    import torch

    images, labels = random_batch(config, batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    return x, torch.from_numpy(labels).float()


def train_torch(config: ConfigDict) -> Callable[[], object]:
    import torch

    from cae_jax import torch_peer

    torch.set_num_threads(cores())
    torch.manual_seed(config.seed)
    model = torch_peer.TorchCAE(config.model)
    step = torch_peer.make_train_step(config, model)
    x, y = _torch_images(config, config.train.batch_size)
    return lambda: step(x, y)


def infer_torch(config: ConfigDict, batch: int) -> Callable[[], object]:
    import torch

    from cae_jax import torch_peer

    torch.set_num_threads(cores())
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
    seconds = interleaved_medians({"ours": run, **({"peer": peer} if peer else {})}, repeats)
    result = {"seconds": seconds["ours"], "images_per_s": images / seconds["ours"], **info,
              "gflops_per_s": info["gflop"] / seconds["ours"]}
    if not peer:
        return result, None
    return result, {"seconds": seconds["peer"], "images_per_s": images / seconds["peer"]}


def in_fresh_process(fn: Callable, *args):
    """fn(*args) run in a new interpreter, for a timed row that must not inherit the heap the
    rows before it left. Measured in one process: classify at batch 32 ran 7-10% slower after
    the train-step row than before it (PyTorch's 0-3%), and most of that went away once the heap
    was trimmed. The child gets this process's environment (so its huge pages) and
    `host_memory.retain_freed_memory`."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=context, initializer=host_memory.retain_freed_memory) as pool:
        return pool.submit(fn, *args).result()


def train_row(config: ConfigDict, repeats: int, with_peer: bool) -> tuple[dict, dict | None]:
    return against_peer(train_jax(config), train_torch(config) if with_peer else None,
                        config.train.batch_size, repeats)


def inference_row(config: ConfigDict, batch: int, repeats: int, with_peer: bool
                  ) -> tuple[dict, dict | None]:
    return against_peer(infer_jax(config, batch), infer_torch(config, batch) if with_peer
                        else None, batch, repeats)


def write_face_dataset(out_dir: Path, size: int, records: int) -> Path:
    """A prepared dataset dir of distinct real face crops (skimage's astronaut, no download)."""
    from skimage import data

    from data_prep import writer

    photo = data.astronaut()

    def examples():
        for i in range(records):
            y, x = 20 + (i * 7) % 120, 100 + (i * 13) % 140
            crop = cv2.resize(photo[y : y + 200, x : x + 200], (size, size))
            yield {"image": crop, "label": i % 2, "dataset": "bench",
                   "method": "fake" if i % 2 else "real", "compression": "raw",
                   "video_id": f"v{i // 4:03d}", "frame_index": i,
                   "face_box": np.array([0, 0, size, size], np.float32), "fps": 25.0}

    return writer.write_dataset(out_dir, "bench", {"train": examples()}, num_shards=2)


def input_pipeline(config: ConfigDict, data_dir: Path, batches: int, repeats: int) -> dict:
    """Training images/s per core: grain (`train_dataset`) and tf.data (`tf_data_reference`)."""
    from cae_jax import input_pipeline as pipeline

    config = ConfigDict(config.to_dict())
    config.input.sbi.prob = 0.0  # tf.data has no self-blending; both do the same work.
    config.input.augment.on_device = "off"  # tf.data augments on the host.
    batch = config.train.batch_size
    result = {}
    for name, make in (("grain", lambda: iter(pipeline.train_dataset(config, [str(data_dir)]))),
                       ("tf.data", lambda: iter(pipeline.tf_data_reference(
                           config, [str(data_dir)]).as_numpy_iterator()))):
        it = make()
        next(it)  # Threads started, first shards open.
        seconds = median_seconds(lambda it=it: [next(it) for _ in range(batches)], repeats, 0)
        result[name] = {"images_per_s_per_core": batches * batch / seconds / cores()}
        close = getattr(it, "close", None)
        if close:
            close()
    return result


def host_seconds_per_image(config: ConfigDict, data_dir: Path, batches: int, on_device: bool
                           ) -> float:
    """Host CPU seconds per training image of `train_dataset` (decode, augment, batch).

    Process CPU time (every thread) over `batches` batches after a warm-up batch, one reader
    thread, so read-ahead adds no work outside the window beyond its few buffered records.
    `on_device`: the host only decodes, resizes and JPEG-recompresses; the train step does
    the rest.
    """
    from cae_jax import input_pipeline as pipeline

    config = ConfigDict(config.to_dict())
    config.input.augment.on_device = "on" if on_device else "off"
    config.input.update(threads=1, buffer=2, prefetch_batches=1, workers=0)
    it = iter(pipeline.train_dataset(config, [str(data_dir)]))
    next(it)
    start = time.process_time()
    for _ in range(batches):
        next(it)
    seconds = time.process_time() - start
    it.close()
    return seconds / (batches * config.train.batch_size)


def host_cores(seconds_per_image: float, images_per_s: float = 2000.0) -> float:
    """Host cores one accelerator needs to be fed `images_per_s` training images."""
    return seconds_per_image * images_per_s


def host_cost(config: ConfigDict, data_dir: Path, batches: int, repeats: int) -> dict:
    """`host_seconds_per_image` with host and with on-device augmentation, taking turns."""
    runs = {"host": [], "on_device": []}
    for _ in range(repeats):
        for mode, values in runs.items():
            values.append(host_seconds_per_image(config, data_dir, batches, mode == "on_device"))
    return {mode: {"cpu_s_per_image": statistics.median(v)} for mode, v in runs.items()}


def input_workers(config: ConfigDict, data_dir: Path, batches: int, repeats: int,
                  counts: tuple[int, ...]) -> dict:
    """Training images/s of `train_dataset` with each grain worker-process count."""
    from cae_jax import input_pipeline as pipeline

    result = {}
    for workers in counts:
        config = ConfigDict(config.to_dict())
        config.input.workers = workers
        config.input.augment.on_device = "off"
        it = iter(pipeline.train_dataset(config, [str(data_dir)]))
        next(it)  # Workers started.
        seconds = median_seconds(lambda it=it: [next(it) for _ in range(batches)], repeats, 0)
        result[str(workers)] = {"images_per_s": batches * config.train.batch_size / seconds}
        it.close()
    return result


def write_face_clip(path: Path, frames: int) -> Path:
    """An MJPG clip of a real face (skimage's astronaut) drifting across a 640x360 frame."""
    from skimage import data

    face = cv2.resize(data.astronaut()[0:240, 120:360], (160, 160))
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 360))
    for i in range(frames):
        frame = np.full((360, 640, 3), 90, np.uint8)
        x = 100 + 8 * i % 380
        frame[100:260, x : x + 160] = face
        out.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    out.release()
    return path


def prepare(clip: Path, frames: int, image_size: int, repeats: int) -> dict:
    """`prepare`'s decode + detect + crop frames/s per core, per detector (dlib where installed)."""
    from data_prep import faces

    result = {}
    for detector in ("mtcnn", "dlib"):
        if detector == "dlib" and not importlib.util.find_spec("dlib"):
            result[detector] = {"note": "dlib not installed (pip install 'cae-jax[dlib]')"}
            continue
        found = []

        def run(detector=detector, found=found):
            found.append(faces.extract_faces(clip, frames, image_size, 1.3, detector))

        seconds = median_seconds(run, repeats)
        result[detector] = {"frames_per_s_per_core": frames / seconds / cores(),
                            "faces": len(found[-1].crops)}
    return result


def row(name: str, ours: float | None, peer: float | None, unit: str, note: str = "") -> dict:
    ratio = ours / peer if ours and peer else None
    return {"benchmark": name, "cae_jax": ours, "peer": peer, "unit": unit, "ratio": ratio,
            "note": note}


def run_all(config: ConfigDict, *, repeats: int, matmul_size: int, layer_scale: int, batches: int,
            infer_batches: tuple[int, ...], clip_frames: int, workdir: Path,
            worker_counts: tuple[int, ...] = (0, 1, 2)) -> dict:
    results = {"machine": machine(), "config": {"image_size": config.model.image_size,
                                                  "train_batch": config.train.batch_size,
                                                  "dtype": config.model.dtype,
                                                  "layer_impl": config.model.layer_impl,
                                                  "repeats": repeats}}
    log("matmul peak")
    peak = matmul_peak(matmul_size, repeats)
    results["matmul_peak"] = peak
    log("layers, native and decomposed")
    results["layers"] = layer_impls(layer_scale, repeats)
    no_torch = torch_reason(config)
    rows = []

    log(f"train step, cae-jax{' alone: ' + no_torch if no_torch else ' and PyTorch in turns'}")
    train, peer = in_fresh_process(train_row, config, repeats, not no_torch)
    results["train"] = {"cae_jax": train, "torch": peer}
    rows.append(row(f"train step, batch {config.train.batch_size}", train["images_per_s"],
                    peer and peer["images_per_s"], "images/s",
                    no_torch or "PyTorch eager, timm legacy_xception + decoder + classifier"))
    rows.append(row("train step compile", train["compile_s"], None, "s"))
    rows.append(row("train step GFLOP/s (share of matmul peak)", train["gflops_per_s"], None,
                    "GFLOP/s", f"{train['gflops_per_s'] / peak['gflops_per_s']:.0%} of "
                    f"{peak['gflops_per_s']:.0f} GFLOP/s"))
    results["inference"] = {}
    for batch in infer_batches:
        log(f"inference, batch {batch}")
        ours, peer = in_fresh_process(inference_row, config, batch, repeats, not no_torch)
        results["inference"][str(batch)] = {"cae_jax": ours, "torch": peer}
        rows.append(row(f"inference, batch {batch}", ours["images_per_s"],
                        peer and peer["images_per_s"], "images/s",
                        no_torch or "exported classify fn vs PyTorch eager inference_mode"))
        rows.append(row(f"inference compile, batch {batch}", ours["compile_s"], None, "s",
                        f"{ours['gflops_per_s']:.1f} GFLOP/s"))

    log("input pipeline, grain and tf.data")
    data_dir = write_face_dataset(workdir / "dataset", config.model.image_size,
                                  max(4 * config.train.batch_size, 16))
    pipe = input_pipeline(config, data_dir, batches, repeats)
    results["input_pipeline"] = pipe
    rows.append(row("input pipeline", pipe["grain"]["images_per_s_per_core"],
                    pipe["tf.data"]["images_per_s_per_core"], "images/s/core",
                    "grain vs tf.data, same augmentations"))

    log("host cost per training image, host and on-device augmentation")
    cost = host_cost(config, data_dir, batches, repeats)
    # A GPU/TPU train step's own rate where this run has one, else 2,000 images/s.
    rate = train["images_per_s"] if jax.default_backend() != "cpu" else 2000.0
    for mode in cost:
        cost[mode]["host_cores"] = host_cores(cost[mode]["cpu_s_per_image"], rate)
    results["host_cost"] = {**cost, "images_per_s": rate}
    rows.append(row("host CPU per training image", cost["on_device"]["cpu_s_per_image"] * 1e3,
                    cost["host"]["cpu_s_per_image"] * 1e3, "ms/image",
                    "on-device augmentation vs on the host (decode + augment + batch)"))
    rows.append(row(f"host cores per accelerator at {rate:.0f} images/s",
                    cost["on_device"]["host_cores"], cost["host"]["host_cores"], "cores",
                    "on-device augmentation vs on the host"))

    log(f"input pipeline, {worker_counts} grain workers")
    workers = input_workers(config, data_dir, batches, repeats, worker_counts)
    results["input_workers"] = workers
    for count, result in workers.items():
        rows.append(row(f"input pipeline, {count} workers", result["images_per_s"], None,
                        "images/s", "grain worker processes (input.workers), host augmentation"))

    log("prepare, mtcnn and dlib")
    clip = write_face_clip(workdir / "clip.avi", clip_frames)
    prep = prepare(clip, clip_frames, config.model.image_size, repeats)
    results["prepare"] = prep
    rows.append(row("prepare (decode + detect + crop)", prep["mtcnn"]["frames_per_s_per_core"],
                    prep["dlib"].get("frames_per_s_per_core"), "frames/s/core",
                    prep["dlib"].get("note", "MTCNN vs dlib HOG")))
    results["rows"] = rows
    return results


def markdown(results: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['machine']}, JAX {m['jax']} "
        f"({m['backend']}), PyTorch {m.get('torch', 'n/a')}; load average "
        f"{m['load_average'][0]:.1f}. Medians of {results['config']['repeats']} repeats.",
        "",
        "| benchmark | cae-jax | peer | unit | cae-jax / peer | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['benchmark']} | {fmt(r['cae_jax'])} | {fmt(r['peer'])} | "
                     f"{r['unit']} | {ratio} | {r['note']} |")
    lines += [
        "",
        f"Matmul peak ({results['matmul_peak']['size']}^2 float32): "
        f"{results['matmul_peak']['gflops_per_s']:.1f} GFLOP/s.",
        "",
        "| layer (`model.layer_impl`) | shapes | native fwd / grad ms | decomposed fwd / grad ms |",
        "|---|---|---|---|",
    ]
    for r in results["layers"]:
        n, d = r["native"], r["decomposed"]
        lines.append(
            f"| {r['layer']} | {' '.join('x'.join(map(str, s)) for s in r['shapes'])} | "
            f"{n['forward_s'] * 1e3:.1f} / {n['gradient_s'] * 1e3:.1f} | "
            f"{d['forward_s'] * 1e3:.1f} / {d['gradient_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="", help="config file (default: the full-size "
                        "defaults; with --smoke: configs/tiny.py); --config.a.b=v overrides follow")
    parser.add_argument("--out", default="bench.json", help="JSON results file")
    parser.add_argument("--markdown", default="", help="also write the table to this file")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per benchmark")
    parser.add_argument("--batch-size", type=int, default=8, help="train step batch")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny iteration of everything (CI): tiny config, 1 repeat")
    parser.add_argument("--accelerator", action="store_true",
                        help="the accelerator rows (bench_accelerator.py) even on the CPU; "
                        "the default wherever JAX's backend is a GPU or TPU")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="accelerator rows: start no row after this many seconds")


def run(args: argparse.Namespace) -> int:
    path = args.config or (TINY_CONFIG if args.smoke else "")
    config = (config_lib.load_config(path, args.overrides) if path
              else config_lib.default_config())
    if not path:
        config_lib.validate(config_lib.apply_overrides(config, args.overrides))
    smoke = args.smoke
    if args.accelerator or jax.default_backend() != "cpu":
        from cae_jax import bench_accelerator

        return bench_accelerator.run(config, smoke=smoke, repeats=args.repeats,
                                     budget_s=args.budget_s, out=Path(args.out),
                                     markdown_path=args.markdown)
    config.train.batch_size = args.batch_size
    config.input.workers = 0
    with tempfile.TemporaryDirectory(prefix="cae_jax_bench_") as workdir:
        results = run_all(
            config,
            repeats=1 if smoke else args.repeats,
            matmul_size=256 if smoke else 2048,
            layer_scale=8 if smoke else 1,
            batches=1 if smoke else 8,
            infer_batches=(1, 4) if smoke else (1, 32),
            clip_frames=2 if smoke else 16,
            worker_counts=(0, 1) if smoke else (0, 1, 2),
            workdir=Path(workdir),
        )
    table = markdown(results)
    print(table)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0
