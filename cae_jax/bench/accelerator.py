"""`cae-jax bench` on a GPU: the full CAE at 299 beside the PyTorch peer on the same device.

Rows, each in a fresh process (the peers share it, taking turns): the train step in bfloat16
compute and in float32, and the exported classify function, each against PyTorch eager
(channels_last, `torch.autocast` bfloat16 where cae-jax computes in bfloat16) and against
`torch.compile` of the same model; achieved TFLOP/s (XLA's count of the step's operations over
its time) against a measured bfloat16 matmul peak; compile times; and peak device memory per
image at the largest train batch that fits (256, 128, 64, 32 tried in that order).

Needs only jax, flax, optax, orbax, ml_collections and, for the peer, torch: nothing
here imports TensorFlow or grain. The rows stop at a time budget and the results are written
after each row, so a run cut short still reports what it measured. `launch/gpu_bench.sh` runs
it; `--accelerator --smoke` runs the same code at a tiny size on the CPU (tests).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from cae_jax.bench import model_rows, timing

LARGEST_BATCHES = (256, 128, 64, 32)
DTYPES = ("bfloat16", "float32")


def matmul_peak_bf16(n: int, repeats: int) -> dict:
    """TFLOP/s of an n x n bfloat16 matmul (float32 accumulation): the device's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    seconds = timing.median_seconds(lambda: matmul(a).block_until_ready(), repeats)
    return {"size": n, "seconds": seconds, "tflops_per_s": 2 * n**3 / seconds / 1e12}


def peak_device_bytes() -> int | None:
    """Peak bytes JAX's allocator held on the first device (None where it does not say)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory"))


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_batch(config: ConfigDict, batch: int, device):
    import torch

    images, labels = model_rows.random_batch(config, batch)
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(labels).float().to(device)


def torch_train(config: ConfigDict, batch: int, compile_backend: str) -> Callable[[], object]:
    """The PyTorch peer's train step at `batch` (a call blocks until the step is done)."""
    import torch

    from cae_jax.bench import torch_peer

    torch.manual_seed(config.seed)
    device = torch_device()
    model = torch_peer.for_device(torch_peer.TorchCAE(config.model), device, compile_backend)
    step = torch_peer.make_train_step(config, model, device)
    x, y = _torch_batch(config, batch, device)
    return lambda: step(x, y)  # loss.item() waits for the device.


def torch_infer(config: ConfigDict, batch: int, compile_backend: str) -> Callable[[], object]:
    """The PyTorch peer's classify (uint8 faces in, probabilities back on the host)."""
    import torch

    from cae_jax.bench import torch_peer

    device = torch_device()
    model = torch_peer.for_device(torch_peer.TorchCAE(config.model).eval(), device)
    classify = torch.compile(model.classify, backend=compile_backend) if compile_backend \
        else model.classify
    images = torch.from_numpy(model_rows.random_batch(config, batch)[0]).to(device)

    def run():
        with torch.inference_mode(), torch_peer.compute_dtype(config, device):
            x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            return torch.sigmoid(classify(x).float()).cpu().numpy()

    return run


def _peers(config: ConfigDict, make: Callable, batch: int, compile_backend: str) -> dict:
    """The PyTorch rows to time beside cae-jax: eager, and compiled where a backend is named."""
    if model_rows.torch_reason(config):
        return {}
    peers = {"torch eager": make(config, batch, "")}
    if compile_backend:
        peers["torch.compile"] = make(config, batch, compile_backend)
    return peers


def _timed(ours: Callable, info: dict, peers: dict[str, Callable], images: int, repeats: int,
           warmup: int) -> dict:
    """Images/s of cae-jax and each peer, taking turns; a peer's first call (its compile) is
    timed apart."""
    first_call = {}
    for name, fn in peers.items():
        start = time.perf_counter()
        fn()
        first_call[name] = time.perf_counter() - start
    seconds = timing.interleaved_medians({"cae-jax": ours, **peers}, repeats, warmup)
    result = {"cae-jax": {**info, "seconds": seconds["cae-jax"],
                          "images_per_s": images / seconds["cae-jax"],
                          "tflops_per_s": info["gflop"] / seconds["cae-jax"] / 1e3}}
    for name in peers:
        result[name] = {"seconds": seconds[name], "images_per_s": images / seconds[name],
                        "first_call_s": first_call[name]}
    return result


def train_row(config: ConfigDict, repeats: int, compile_backend: str) -> dict:
    """cae-jax's jitted train step against the peers, at the config's batch and dtype."""
    batch = config.train.batch_size
    run, info = model_rows.train_jax(config)
    result = _timed(run, info, _peers(config, torch_train, batch, compile_backend), batch,
                    repeats, warmup=2)
    result["cae-jax"]["peak_bytes"] = peak_device_bytes()
    return result


def inference_row(config: ConfigDict, repeats: int, compile_backend: str) -> dict:
    batch = config.train.batch_size
    run, info = model_rows.infer_jax(config, batch)
    return _timed(run, info, _peers(config, torch_infer, batch, compile_backend), batch,
                  repeats, warmup=2)


def memory_row(config: ConfigDict, repeats: int) -> dict:
    """Train-step images/s and peak device memory per image, cae-jax and PyTorch eager, at
    the config's batch; {"out_of_memory": side} when either does not fit."""
    batch = config.train.batch_size
    result = {}
    try:
        run, info = model_rows.train_jax(config)
        seconds = timing.median_seconds(run, repeats, warmup=2)
    except Exception as err:  # noqa: BLE001 - only running out of memory is an answer here.
        if is_out_of_memory(err):
            return {"out_of_memory": "cae-jax"}
        raise
    peak = peak_device_bytes()
    result["cae-jax"] = {"images_per_s": batch / seconds, "compile_s": info["compile_s"],
                         "peak_bytes_per_image": peak / batch if peak else None}
    if model_rows.torch_reason(config):
        return result
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        step = torch_train(config, batch, "")
        seconds = timing.median_seconds(step, repeats, warmup=2)
    except torch.cuda.OutOfMemoryError:
        return {**result, "torch eager": {"out_of_memory": True}}
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    result["torch eager"] = {"images_per_s": batch / seconds,
                             "peak_bytes_per_image": peak / batch if peak else None}
    return result


def with_dtype_and_batch(config: ConfigDict, dtype: str, batch: int) -> ConfigDict:
    config = ConfigDict(config.to_dict())
    config.model.dtype = dtype
    config.train.batch_size = batch
    return config


def run_rows(config: ConfigDict, *, repeats: int, matmul_size: int, batch: int,
             dtypes: tuple[str, ...], largest_batches: tuple[int, ...], compile_backend: str,
             budget_s: float, out: Path, markdown_path: str) -> dict:
    """Every accelerator row until `budget_s` runs out; `out` (and the table at
    `markdown_path`, if any) is rewritten after each row, so a run killed later keeps them."""
    deadline = time.monotonic() + budget_s
    results = {"machine": {**timing.machine(), "accelerator": jax.devices()[0].device_kind},
               "batch": batch, "image_size": config.model.image_size,
               "repeats": repeats, "compile_backend": compile_backend,
               "date": time.strftime("%Y-%m-%d"), "skipped": []}
    if not model_rows.torch_reason(config):
        results["torch_device"] = str(torch_device())
    results["peer_note"] = model_rows.torch_reason(config)

    def save():
        out.write_text(json.dumps(results, indent=2))
        if markdown_path:
            Path(markdown_path).write_text(markdown(results) + "\n")

    def step(name: str, fn: Callable, *args):
        if time.monotonic() > deadline:
            results["skipped"].append(name)
            timing.log(f"{name}: skipped, time budget spent")
            return None
        timing.log(name)
        value = timing.in_fresh_process(fn, *args)
        results.setdefault("rows", {})[name] = value
        save()
        return value

    step("matmul peak bf16", matmul_peak_bf16, matmul_size, repeats)
    for dtype in dtypes:
        sized = with_dtype_and_batch(config, dtype, batch)
        step(f"train step {dtype}", train_row, sized, repeats, compile_backend)
        step(f"inference {dtype}", inference_row, sized, repeats, compile_backend)
    for largest in largest_batches:
        found = step(f"memory bfloat16 batch {largest}", memory_row,
                     with_dtype_and_batch(config, "bfloat16", largest), repeats)
        if found is None or "out_of_memory" not in found:
            break
    save()
    return results


def markdown(results: dict) -> str:
    """The accelerator table: one line per timed row, ratios against the faster peer."""
    m = results["machine"]
    rows = results.get("rows", {})
    peak = rows.get("matmul peak bf16", {}).get("tflops_per_s")
    lines = [
        f"{results['date']}, {m.get('accelerator', m['backend'])}; JAX {m['jax']}, PyTorch "
        f"{m.get('torch', 'n/a')}; full CAE at {results['image_size']}, batch "
        f"{results['batch']}, medians of {results['repeats']} repeats. Matmul peak (bf16): "
        + (f"{peak:.3g} TFLOP/s." if peak else "n/a."),
        "",
        "| row | cae-jax images/s | torch eager | torch.compile | cae-jax / faster peer | "
        "cae-jax TFLOP/s (share of peak) | cae-jax compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        if not name.startswith(("train step", "inference")):
            continue
        ours = row["cae-jax"]
        peers = [row[p]["images_per_s"] for p in ("torch eager", "torch.compile") if p in row]
        cells = [f"{row[p]['images_per_s']:.1f}" if p in row else "n/a"
                 for p in ("torch eager", "torch.compile")]
        ratio = f"{ours['images_per_s'] / max(peers):.2f}x" if peers else ""
        share = f" ({ours['tflops_per_s'] / peak:.0%})" if peak else ""
        lines.append(f"| {name} | {ours['images_per_s']:.1f} | {cells[0]} | {cells[1]} | "
                     f"{ratio} | {ours['tflops_per_s']:.3g}{share} | {ours['compile_s']:.1f} |")
    for name, row in rows.items():
        if name.startswith("memory") and "cae-jax" in row:
            per_image = {k: v.get("peak_bytes_per_image") for k, v in row.items()}
            lines.append("")
            lines.append(f"Largest train batch that fit ({name.split()[-1]}, bfloat16): "
                         + ", ".join(f"{k} {v / 2**20:.0f} MiB/image" if v else f"{k} n/a"
                                     for k, v in per_image.items()) + ".")
    if results["skipped"]:
        lines += ["", "Skipped at the time budget: " + ", ".join(results["skipped"]) + "."]
    if results.get("peer_note"):
        lines += ["", f"No PyTorch peer: {results['peer_note']}."]
    return "\n".join(lines)


def run(config: ConfigDict, *, smoke: bool, repeats: int, budget_s: float, out: Path,
        markdown_path: str) -> int:
    """`cae-jax bench --accelerator`: the rows above, then the table."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU.
    on_cpu = jax.default_backend() == "cpu"
    results = run_rows(
        config,
        repeats=1 if smoke else repeats,
        matmul_size=256 if smoke else 8192,
        batch=2 if smoke else 32,
        dtypes=DTYPES[:1] if smoke else DTYPES,
        largest_batches=(2,) if smoke else LARGEST_BATCHES,
        # torch.compile's code generation needs a GPU to be worth timing; "eager" checks the
        # compiled path's tracing on the CPU.
        compile_backend="eager" if on_cpu else "inductor",
        budget_s=budget_s,
        out=out,
        markdown_path=markdown_path,
    )
    print(markdown(results))
    return 0
