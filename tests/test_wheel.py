"""The built wheel works outside the checkout: it ships configs, kernels and splits, and its
`cae-jax` runs `demo --help`, `bench --help` and a tiny `train --config configs/tiny.py` from
another directory."""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from tests import datasets

ROOT = Path(__file__).resolve().parent.parent


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                 "-w", str(wheels), str(ROOT)], tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("cae_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"cae_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert shipped <= names
    assert "cae_jax/ops/cpu_kernels.cc" in names
    assert "cae_jax/serve_page.html" in names  # The page `cae-jax serve` answers / with.
    assert {"data_prep/splits/train.json", "data_prep/splits/val.json",
            "data_prep/splits/test.json"} <= names

    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    venv_site = Path(run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                         tmp_path).stdout.strip())
    # The test environment's packages as dependencies, appended after the venv's own site so
    # that the wheel's cae_jax wins over any editable install found there.
    (venv_site / "zz_test_env.pth").write_text(
        "import sys; sys.path.extend(" + repr(site.getsitepackages()) + ")\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                     "--no-deps", "--no-index", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = run([str(python), "-c", "import cae_jax; print(cae_jax.__file__)"], outside)
    assert Path(where.stdout.strip()).is_relative_to(venv_site), where.stdout + where.stderr

    cli = venv / "bin" / "cae-jax"
    demo_help = run([str(cli), "demo", "--help"], outside)
    assert demo_help.returncode == 0 and "configs/demo.py" in demo_help.stdout, demo_help.stderr
    bench_help = run([str(cli), "bench", "--help"], outside)
    assert bench_help.returncode == 0 and "--accelerator" in bench_help.stdout, bench_help.stderr

    data_dir = datasets.write(tmp_path / "data", {"train": (4, 4), "validation": (2, 2)},
                              num_shards=1)
    workdir = tmp_path / "run"
    trained = run([str(cli), "train", "--config", "configs/tiny.py", "--workdir", str(workdir),
                   f"--config.input.train_dirs=('{data_dir}',)", "--config.train.steps=2",
                   "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
                   "--config.train.log_every=1"], outside)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (workdir / "checkpoints" / "2").is_dir()
