"""The accelerator benchmark (`launch/gpu_bench.sh`, `cae_jax/bench/accelerator.py`), tiny on the
CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cae_jax import config as config_lib
from cae_jax.bench import accelerator, model_rows, timing

SCRIPT = Path(__file__).parents[1] / "launch" / "gpu_bench.sh"
HAS_PEER = bool(importlib.util.find_spec("torch"))


def test_gpu_bench_script_runs_every_row_and_writes_json_and_table(tmp_path):
    out = subprocess.run(
        ["bash", str(SCRIPT), "--out-dir", str(tmp_path), "--", "--accelerator", "--smoke"],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
        timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert list(results["rows"]) == ["matmul peak bf16", "train step bfloat16",
                                     "inference bfloat16", "memory bfloat16 batch 2"]
    assert results["skipped"] == [] and results["image_size"] == 64
    for name in ("train step bfloat16", "inference bfloat16"):
        ours = results["rows"][name]["cae-jax"]
        assert ours["images_per_s"] > 0 and ours["compile_s"] > 0 and ours["gflop"] > 0
        assert math.isclose(ours["tflops_per_s"], ours["gflop"] / ours["seconds"] / 1e3)
    table = (tmp_path / "gpu_bench.md").read_text()
    assert "| train step bfloat16 |" in table and "| inference bfloat16 |" in table
    # The tiny config has no legacy_xception peer (fixed widths): the table says why.
    assert results["peer_note"] and f"No PyTorch peer: {results['peer_note']}" in table


def test_time_budget_stops_rows_and_keeps_the_table(tmp_path):
    config = config_lib.load_config("configs/tiny.py")
    results = accelerator.run_rows(
        config, repeats=1, matmul_size=64, batch=2, dtypes=("float32",), largest_batches=(2,),
        compile_backend="", budget_s=0, out=tmp_path / "r.json",
        markdown_path=str(tmp_path / "r.md"))
    assert results["skipped"] == ["matmul peak bf16", "train step float32", "inference float32",
                                  "memory bfloat16 batch 2"]
    assert json.loads((tmp_path / "r.json").read_text())["skipped"] == results["skipped"]
    assert "Skipped at the time budget: matmul peak bf16" in (tmp_path / "r.md").read_text()


def test_largest_batch_search_steps_down_past_out_of_memory(tmp_path, monkeypatch):
    """256 runs out of memory (as XLA reports it), 128 fits: the search stops there."""
    tried = []

    def fake_train_jax(config):
        tried.append(config.train.batch_size)
        if config.train.batch_size > 128:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return (lambda: None), {"compile_s": 1.0, "gflop": 1.0}

    monkeypatch.setattr(timing, "in_fresh_process", lambda fn, *args: fn(*args))
    monkeypatch.setattr(model_rows, "train_jax", fake_train_jax)
    monkeypatch.setattr(model_rows, "torch_reason", lambda config: "no peer in this test")
    config = config_lib.load_config("configs/tiny.py")
    results = accelerator.run_rows(
        config, repeats=1, matmul_size=64, batch=2, dtypes=(), largest_batches=(256, 128, 64),
        compile_backend="", budget_s=60, out=tmp_path / "r.json", markdown_path="")
    assert tried == [256, 128]
    assert results["rows"]["memory bfloat16 batch 256"] == {"out_of_memory": "cae-jax"}
    assert results["rows"]["memory bfloat16 batch 128"]["cae-jax"]["images_per_s"] > 0
    with pytest.raises(ValueError, match="not memory"):
        monkeypatch.setattr(model_rows, "train_jax", lambda config: (_ for _ in ()).throw(
            ValueError("not memory")))
        accelerator.memory_row(config, 1)


@pytest.mark.skipif(not HAS_PEER, reason="torch not installed")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_peer_trains_and_classifies_eager_and_compiled(dtype):
    """The peer's code paths at the smallest Xception input; "eager" is torch.compile's
    tracing without code generation."""
    config = config_lib.default_config()
    config.model.image_size = 71
    config.model.dtype = dtype
    for backend in ("", "eager"):
        loss = accelerator.torch_train(config, 2, backend)()
        assert np.isfinite(loss) and loss > 0
        probs = accelerator.torch_infer(config, 2, backend)()
        assert probs.shape == (2,) and np.all((probs > 0) & (probs < 1))
