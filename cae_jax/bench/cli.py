"""`cae-jax bench`: speed of training, inference, input pipeline and face extraction, each beside
a peer measured in the same run on the same machine.

Peers: PyTorch eager with timm's `legacy_xception` plus the same decoder and classifier (the
`bench` extra; "n/a" without it), and for the train step on EfficientNet-B4 the same CAE around
timm's `efficientnet_b4` (`torch_efficientnet`); tf.data for the input pipeline; dlib's HOG
detector for `prepare` (the `dlib` extra). Times are medians over repeats (train and
inference: cae-jax and PyTorch taking turns, repeat by repeat, each of these rows in a fresh
process); compile time is reported apart. The peer's `legacy_xception` is timm's module
written in plain torch (`torch_peer.LegacyXception`: timm needs torchvision, absent beside the
pinned CPU torch).
GFLOP/s come from XLA's cost analysis, beside a measured large float32 matmul (the peak).
On a GPU or TPU (or with `--accelerator`) the rows of `accelerator` run instead.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
from ml_collections import ConfigDict

from cae_jax import backbones
from cae_jax import config as config_lib
from cae_jax.bench import input_rows, layers, model_rows, prepare_rows, report, timing

ACCEPTS_CONFIG_OVERRIDES = True
TINY_CONFIG = config_lib.shipped_config("tiny")


def on_efficientnet_b4(config: ConfigDict, smoke: bool) -> ConfigDict | None:
    """The bench's config with EfficientNet-B4 as the encoder, as configs/ffpp_c23_effb4.py sets
    it (with --smoke, the tests' narrow B4 of configs/tiny_effb4.py); None where the config's
    encoder is B4 already."""
    if backbones.name_of(config.model) == backbones.efficientnet.NAME:
        return None
    source = config_lib.load_config(
        config_lib.shipped_config("tiny_effb4" if smoke else "ffpp_c23_effb4"))
    b4 = config.copy_and_resolve_references()
    b4.model.encoder = source.model.encoder
    b4.model.bn_epsilon = source.model.bn_epsilon
    return b4


def train_rows(config: ConfigDict, repeats: int, peak: dict, suffix: str = ""
               ) -> tuple[dict, list[dict]]:
    """The train step, cae-jax beside the PyTorch peer on the same encoder (in turns, in a
    fresh process): its results and rows (rate, compile, GFLOP/s), names ending in `suffix`."""
    no_torch = model_rows.torch_reason(config)
    timing.log(f"train step{suffix}, cae-jax"
               + (f" alone: {no_torch}" if no_torch else " and PyTorch in turns"))
    train, peer = timing.in_fresh_process(model_rows.train_row, config, repeats, not no_torch)
    arch = backbones.backbone(config.model).TIMM_ARCH
    rows = [
        report.row(f"train step, batch {config.train.batch_size}{suffix}", train["images_per_s"],
                   peer and peer["images_per_s"], "images/s",
                   no_torch or f"PyTorch eager, timm {arch} + decoder + classifier"),
        report.row(f"train step compile{suffix}", train["compile_s"], None, "s"),
        report.row(f"train step GFLOP/s (share of matmul peak){suffix}", train["gflops_per_s"],
                   None, "GFLOP/s", f"{train['gflops_per_s'] / peak['gflops_per_s']:.0%} of "
                   f"{peak['gflops_per_s']:.0f} GFLOP/s"),
    ]
    return {"cae_jax": train, "torch": peer}, rows


def run_all(config: ConfigDict, *, repeats: int, matmul_size: int, layer_scale: int, batches: int,
            infer_batches: tuple[int, ...], clip_frames: int, workdir: Path,
            worker_counts: tuple[int, ...] = (0, 1, 2), b4: ConfigDict | None = None) -> dict:
    """Every CPU row of `config`; with `b4` (`on_efficientnet_b4`) its train-step rows too."""
    results = {"machine": timing.machine(),
               "config": {"image_size": config.model.image_size,
                          "train_batch": config.train.batch_size,
                          "dtype": config.model.dtype,
                          "layer_impl": config.model.layer_impl,
                          "repeats": repeats}}
    timing.log("matmul peak")
    peak = layers.matmul_peak(matmul_size, repeats)
    results["matmul_peak"] = peak
    timing.log("layers, native and decomposed")
    results["layers"] = layers.layer_impls(layer_scale, repeats)
    no_torch = model_rows.torch_reason(config)
    results["train"], rows = train_rows(config, repeats, peak)
    train = results["train"]["cae_jax"]
    if b4 is not None:
        results["train_efficientnet_b4"], b4_rows = train_rows(b4, repeats, peak,
                                                               ", EfficientNet-B4")
        rows += b4_rows
    results["inference"] = {}
    for batch in infer_batches:
        timing.log(f"inference, batch {batch}")
        ours, peer = timing.in_fresh_process(model_rows.inference_row, config, batch, repeats,
                                             not no_torch)
        results["inference"][str(batch)] = {"cae_jax": ours, "torch": peer}
        rows.append(report.row(f"inference, batch {batch}", ours["images_per_s"],
                               peer and peer["images_per_s"], "images/s",
                               no_torch or "exported classify fn vs PyTorch eager inference_mode"))
        rows.append(report.row(f"inference compile, batch {batch}", ours["compile_s"], None, "s",
                               f"{ours['gflops_per_s']:.1f} GFLOP/s"))

    timing.log("input pipeline, grain and tf.data")
    data_dir = input_rows.write_face_dataset(workdir / "dataset", config.model.image_size,
                                             max(4 * config.train.batch_size, 16))
    pipe = input_rows.input_pipeline(config, data_dir, batches, repeats)
    results["input_pipeline"] = pipe
    rows.append(report.row("input pipeline", pipe["grain"]["images_per_s_per_core"],
                           pipe["tf.data"]["images_per_s_per_core"], "images/s/core",
                           "grain vs tf.data, same augmentations"))

    timing.log("host cost per training image, host and on-device augmentation")
    cost = input_rows.host_cost(config, data_dir, batches, repeats)
    # A GPU/TPU train step's own rate where this run has one, else 2,000 images/s.
    rate = train["images_per_s"] if jax.default_backend() != "cpu" else 2000.0
    for mode in cost:
        cost[mode]["host_cores"] = input_rows.host_cores(cost[mode]["cpu_s_per_image"], rate)
    results["host_cost"] = {**cost, "images_per_s": rate}
    rows.append(report.row("host CPU per training image",
                           cost["on_device"]["cpu_s_per_image"] * 1e3,
                           cost["host"]["cpu_s_per_image"] * 1e3, "ms/image",
                           "on-device augmentation vs on the host (decode + augment + batch)"))
    rows.append(report.row(f"host cores per accelerator at {rate:.0f} images/s",
                           cost["on_device"]["host_cores"], cost["host"]["host_cores"], "cores",
                           "on-device augmentation vs on the host"))

    timing.log(f"input pipeline, {worker_counts} grain workers")
    workers = input_rows.input_workers(config, data_dir, batches, repeats, worker_counts)
    results["input_workers"] = workers
    for count, result in workers.items():
        rows.append(report.row(f"input pipeline, {count} workers", result["images_per_s"], None,
                               "images/s",
                               "grain worker processes (input.workers), host augmentation"))

    timing.log("prepare, mtcnn and dlib")
    clip = prepare_rows.write_face_clip(workdir / "clip.avi", clip_frames)
    prep = prepare_rows.prepare(clip, clip_frames, config.model.image_size, repeats)
    results["prepare"] = prep
    rows.append(report.row("prepare (decode + detect + crop)",
                           prep["mtcnn"]["frames_per_s_per_core"],
                           prep["dlib"].get("frames_per_s_per_core"), "frames/s/core",
                           prep["dlib"].get("note", "MTCNN vs dlib HOG")))
    results["rows"] = rows
    return results


def run_serve(config: ConfigDict, args: argparse.Namespace) -> int:
    """`bench --serve`: the service rows against `--serve-model`, or the config's model."""
    from cae_jax.bench import serve_rows

    smoke = args.smoke
    results = {"machine": timing.machine(),
               "config": {"image_size": config.model.image_size, "repeats": 1}}
    with tempfile.TemporaryDirectory(prefix="cae_jax_bench_") as workdir:
        bundle = Path(args.serve_model) if args.serve_model else untrained_bundle(
            config, Path(workdir) / "bundle")
        image_size = json.loads((bundle / "model.json").read_text())["image_size"]
        results["service"] = serve_rows.service(
            bundle, image_size, clients=(1, 4, 16), requests=16 if smoke else 400,
            memory_requests=(8, 16) if smoke else (100, 1000),
            flags=["--detector", "haar"] if smoke else [])
    results["rows"] = serve_rows.rows(results["service"])
    return write_results(results, args)


def write_results(results: dict, args: argparse.Namespace) -> int:
    """Prints the table; writes the JSON to --out and the table to --markdown."""
    table = report.markdown(results)
    print(table)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


def untrained_bundle(config: ConfigDict, out: Path) -> Path:
    """The config's model at its initialization, as a params-only bundle: what serving
    costs does not depend on what the weights learned."""
    from flax import nnx

    from cae_jax import export, models

    _, params, batch_stats = nnx.split(models.build_model(config.model, config.seed),
                                       nnx.Param, nnx.BatchStat)
    return export.export_bundle(config, params, batch_stats, out, formats=())


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
                        help="the accelerator rows (cae_jax/bench/accelerator.py) even on the "
                        "CPU; the default wherever JAX's backend is a GPU or TPU")
    parser.add_argument("--serve", action="store_true",
                        help="the service rows only (cae_jax/bench/serve_rows.py): 1, 4 and 16 "
                        "HTTP clients of `cae-jax serve`, memory after 100 vs 1,000 requests")
    parser.add_argument("--serve-model", default="",
                        help="with --serve: the bundle to serve (default: the config's model, "
                        "untrained, exported for the run)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="accelerator rows: start no row after this many seconds")


def run(args: argparse.Namespace) -> int:
    path = args.config or (TINY_CONFIG if args.smoke else "")
    config = (config_lib.load_config(path, args.overrides) if path
              else config_lib.default_config())
    if not path:
        config_lib.validate(config_lib.apply_overrides(config, args.overrides))
    smoke = args.smoke
    if args.serve:
        return run_serve(config, args)
    if args.accelerator or jax.default_backend() != "cpu":
        from cae_jax.bench import accelerator

        return accelerator.run(config, smoke=smoke, repeats=args.repeats,
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
            b4=on_efficientnet_b4(config, smoke),
        )
    return write_results(results, args)
