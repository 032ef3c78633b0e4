"""`cae-jax bench --smoke`: one tiny iteration of every benchmark (no timing asserted)."""

import importlib.util
import json
import os
import time

import numpy as np
import pytest

from cae_jax import config as config_lib
from cae_jax import main
from cae_jax.bench import input_rows, layers, model_rows, report, timing

ROWS = [
    "train step, batch 8",
    "train step compile",
    "train step GFLOP/s (share of matmul peak)",
    "train step, batch 8, EfficientNet-B4",
    "train step compile, EfficientNet-B4",
    "train step GFLOP/s (share of matmul peak), EfficientNet-B4",
    "inference, batch 1",
    "inference compile, batch 1",
    "inference, batch 4",
    "inference compile, batch 4",
    "input pipeline",
    "host CPU per training image",
    "host cores per accelerator at 2000 images/s",
    "input pipeline, 0 workers",
    "input pipeline, 1 workers",
    "prepare (decode + detect + crop)",
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main.main(["bench", "--smoke", "--out", str(out / "bench.json"),
                      "--markdown", str(out / "bench.md")])
    return code, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_smoke_runs_every_benchmark_and_writes_json_and_table(smoke):
    code, results, table = smoke
    assert code == 0
    assert [r["benchmark"] for r in results["rows"]] == ROWS
    ours = {r["benchmark"]: r["cae_jax"] for r in results["rows"]}
    assert all(v > 0 for v in ours.values())
    assert results["config"] == {"image_size": 64, "train_batch": 8, "dtype": "float32",
                                 "layer_impl": "auto", "repeats": 1}
    assert [r["layer"] for r in results["layers"]] == [name for name, _, _ in
                                                       layers.layer_cases(8)]
    for r in results["layers"]:
        assert all(r[impl][t] > 0 for impl in ("native", "decomposed")
                   for t in ("forward_s", "gradient_s"))
        assert f"| {r['layer']} |" in table
    assert results["train"]["cae_jax"]["gflop"] > 0
    b4 = results["train_efficientnet_b4"]  # Beside timm's B4 in PyTorch where torch is.
    assert b4["cae_jax"]["gflop"] > 0
    assert (b4["torch"] is None) == (importlib.util.find_spec("torch") is None)
    assert results["input_pipeline"]["tf.data"]["images_per_s_per_core"] > 0
    cost = results["host_cost"]
    assert cost["images_per_s"] == 2000.0  # No accelerator train-step rate on CPU.
    for mode in ("host", "on_device"):
        assert cost[mode]["host_cores"] == pytest.approx(cost[mode]["cpu_s_per_image"] * 2000)
    assert sorted(results["input_workers"]) == ["0", "1"]
    assert results["prepare"]["mtcnn"]["faces"] == 2  # Both frames of the clip show the face.
    for r in results["rows"]:
        assert f"| {r['benchmark']} |" in table


def test_tiny_config_has_no_torch_peer_and_says_why(smoke):
    _, results, table = smoke
    train = results["rows"][0]
    assert train["peer"] is None and train["ratio"] is None
    assert "n/a" in table and train["note"]


def test_timed_rows_run_in_a_fresh_process_with_this_environment(monkeypatch):
    monkeypatch.setenv("CAE_JAX_BENCH_PROBE", "from the parent")
    assert timing.in_fresh_process(os.getpid) != os.getpid()
    assert timing.in_fresh_process(os.getenv, "CAE_JAX_BENCH_PROBE") == "from the parent"
    with pytest.raises(ValueError, match="invalid literal"):
        timing.in_fresh_process(int, "not a number")


def test_ratio_is_ours_over_peer():
    assert report.row("x", 3.0, 2.0, "images/s")["ratio"] == 1.5
    assert report.row("x", 3.0, None, "images/s")["ratio"] is None


def test_median_seconds_times_each_repeat_after_warmup():
    calls = []
    assert timing.median_seconds(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5


def test_ours_and_peer_take_turns_and_each_gets_its_own_median(monkeypatch):
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    # Each call of "slow" advances the fake clock by 3 ticks (start, 2 inside, end), "fast" by 1.
    medians = timing.interleaved_medians(
        {"slow": lambda: calls.append(("slow", next(clock), next(clock))),
         "fast": lambda: calls.append(("fast",))}, repeats=3, warmup=1)
    assert [c[0] for c in calls] == ["slow", "fast"] * 4
    assert medians == {"slow": 3, "fast": 1}


def test_interleaved_medians_order_a_slow_and_a_fast_function():
    medians = timing.interleaved_medians({"slow": lambda: time.sleep(0.03), "fast": lambda: None},
                                        repeats=3, warmup=0)
    assert medians["slow"] >= 0.03 > medians["fast"]


def test_against_peer_runs_the_peer_in_turn_and_reports_both():
    calls = []
    ours = (lambda: calls.append("ours"), {"gflop": 2.0})
    result, peer = model_rows.against_peer(ours, lambda: calls.append("peer"), images=8, repeats=2)
    assert calls == ["ours", "peer"] * 3  # One warm-up, two timed repeats each.
    assert peer["images_per_s"] == pytest.approx(8 / peer["seconds"])
    assert result["gflops_per_s"] == pytest.approx(2.0 / result["seconds"])
    assert model_rows.against_peer(ours, None, images=8, repeats=1)[1] is None


def test_host_cores_scale_with_the_rate():
    assert input_rows.host_cores(0.005) == pytest.approx(10.0)  # 5 ms per image at 2,000 images/s.
    assert input_rows.host_cores(0.005, 10_000) == pytest.approx(50.0)


@pytest.mark.parametrize("config_file", ["", "configs/ffpp_c23_effb4.py"])
def test_torch_peer_runs_a_train_step_and_inference(config_file):
    """Where torch is installed (the test extra has it): the peer rows execute (full widths,
    small input), on Xception and on EfficientNet-B4."""
    pytest.importorskip("torch")
    config = (config_lib.load_config(config_file) if config_file
              else config_lib.default_config())
    config.model.image_size = 64
    config.train.batch_size = 2
    assert model_rows.torch_reason(config) == ""
    loss = model_rows.train_torch(config)()
    assert np.isfinite(loss) and loss > 0
    probs = model_rows.infer_torch(config, 2)()
    assert probs.shape == (2,) and np.all((probs >= 0) & (probs <= 1))
