"""Sweeps: a Python file of config-override grids, expanded into runs and launched.

A sweep file defines `get_sweep()` returning a list of {config key: value} points, built with
`sweep`, `product` and `zipit`:

    from cae_jax.sweep import product, sweep

    def get_sweep():
        return product(
            sweep("loss.recon_weight", [0.1, 0.5, 1.0, 2.0]),
            sweep("optim.learning_rate", [1e-4, 2e-4]),
        )

`cae-jax sweep FILE --config CONFIG --workdir DIR` checks every point against CONFIG, writes the
plan to DIR/sweep.json (each run: index, name, overrides, workdir DIR/NAME, the `cae-jax train`
arguments and, with `--test-data`, the `cae-jax evaluate` arguments that score the run's best
checkpoint on the test split), then launches it: `local` runs one after another here, `slurm`
submits one job array (task i runs `cae-jax sweep --workdir DIR --run-index i`), `tpu` runs them
one after another on every worker of a TPU pod. `cae-jax sweep-report DIR` collects the results.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etils import epath

from cae_jax import atomic_file
from cae_jax import config as config_lib

PLAN_FILE = "sweep.json"
TEST_METRICS_FILE = "test_metrics.json"  # `cae-jax evaluate` of the run's best checkpoint.
BACKENDS = ("local", "slurm", "tpu")
LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"

Point = dict[str, Any]


def sweep(key: str, values: Sequence[Any]) -> list[Point]:
    """One config key taking each of `values` in turn."""
    if not values:
        raise ValueError(f"sweep over {key!r} has no values")
    return [{key: value} for value in values]


def product(*sweeps: list[Point]) -> list[Point]:
    """Every combination of the given sweeps (the first varies slowest)."""
    points = []
    for combination in itertools.product(*sweeps):
        points.append(_merge(combination))
    return points


def zipit(*sweeps: list[Point]) -> list[Point]:
    """The i-th points of all sweeps together; the sweeps must have equal lengths."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zipit needs sweeps of equal length, got {sorted(lengths)}")
    return [_merge(combination) for combination in zip(*sweeps, strict=True)]


def _merge(points: Sequence[Point]) -> Point:
    merged: Point = {}
    for point in points:
        for key in point:
            if key in merged:
                raise ValueError(f"config key {key!r} is swept twice in one point")
        merged.update(point)
    return merged


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    overrides: Point
    workdir: str
    args: list[str]  # `cae-jax` arguments: ["train", "--config", ..., "--workdir", ...].
    # `cae-jax evaluate` arguments scoring the best checkpoint on the test split; [] = none.
    evaluate: list[str] = dataclasses.field(default_factory=list)

    def commands(self) -> list[list[str]]:
        """The run's `cae-jax` argument lists, in order: train, then test evaluation."""
        return [self.args, self.evaluate] if self.evaluate else [self.args]


def load_sweep(path: str | Path) -> list[Point]:
    """The points of a sweep file (`get_sweep()`), checked for shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    module = config_lib.python_file(path, "cae_jax_sweep")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path}: a sweep file defines get_sweep()")
    points = list(module.get_sweep())
    if not points:
        raise ValueError(f"{path}: get_sweep() returned no points")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or not all(isinstance(k, str) for k in point):
            raise ValueError(f"{path}: point {i} is not a dict of config keys: {point!r}")
    return points


def override_flag(key: str, value: Any) -> str:
    """`--config.KEY=VALUE`, written so that `config.apply_overrides` reads `value` back."""
    text = value if isinstance(value, str) else repr(value)
    return f"--config.{key}={text}"


def run_name(index: int, point: Point) -> str:
    """A directory name that says what the run changes, e.g. 003-recon_weight=0.5,lr=0.0002."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", "-".join([f"{index:03d}", ",".join(parts)]))[:120]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "x".join(_short(v) for v in value)
    return str(value)


def expand(
    points: Sequence[Point],
    config_path: str,
    base_overrides: Sequence[str],
    workdir: str,
    test_data: str = "",
    test_split: str = "test",
) -> list[Run]:
    """Runs for the points, each checked against the config it will train with.

    With `test_data` (comma-separated prepared dirs) each run then evaluates its best
    checkpoint (by validation AUC) on `test_split`, into RUN/test_metrics.json.
    """
    base = config_lib.load_config(config_path, list(base_overrides))
    runs = []
    for index, point in enumerate(points):
        flags = [override_flag(key, value) for key, value in point.items()]
        try:
            config_lib.validate(config_lib.apply_overrides(copy.deepcopy(base), flags))
        except (KeyError, ValueError) as err:
            raise ValueError(f"sweep point {index} {point!r}: {err}") from err
        name = run_name(index, point)
        run_dir = str(epath.Path(workdir) / name)
        args = ["train", "--config", config_path, "--workdir", run_dir, *base_overrides, *flags]
        evaluate = []
        if test_data:
            out = str(epath.Path(run_dir) / TEST_METRICS_FILE)
            evaluate = ["evaluate", "--checkpoint", run_dir, "--data", test_data]
            evaluate += ["--split", test_split, "--out", out]
        runs.append(Run(index, name, dict(point), run_dir, args, evaluate))
    return runs


def write_plan(workdir: str, plan: dict[str, Any]) -> None:
    """Writes DIR/sweep.json; a different sweep already there is an error, never overwritten."""
    directory = epath.Path(workdir)
    path = directory / PLAN_FILE
    if path.exists():
        existing = json.loads(path.read_text())
        if existing["runs"] != plan["runs"]:
            raise ValueError(f"{path} holds a different sweep; choose a new --workdir")
        return
    directory.mkdir(parents=True, exist_ok=True)
    atomic_file.write_text(path, json.dumps(plan, indent=2))


def read_runs(workdir: str) -> list[Run]:
    """The runs of the plan in DIR/sweep.json."""
    path = epath.Path(workdir) / PLAN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sweep directory?")
    try:
        return [Run(**run) for run in json.loads(path.read_text())["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a sweep plan ({err})") from err


def local_commands(runs: Sequence[Run]) -> list[list[list[str]]]:
    return [[[sys.executable, "-m", "cae_jax.main", *c] for c in run.commands()] for run in runs]


def slurm_command(workdir: str, runs: Sequence[Run], launcher_args: Sequence[str]) -> list[str]:
    """One job array over the runs; each task reads its run from the plan."""
    return [
        str(LAUNCH_DIR / "slurm.sh"),
        "--array",
        array_spec([run.index for run in runs]),
        "--job-name",
        f"sweep-{epath.Path(workdir).name}",
        "--output",
        str(epath.Path(workdir) / "slurm-%A_%a.out"),
        *launcher_args,
        "--",
        "sweep",
        "--workdir",
        workdir,
    ]


def array_spec(indices: Sequence[int]) -> str:
    """SLURM --array spec of sorted indices, runs of consecutive ones as ranges: 0-3,7."""
    parts = []
    for _, group in itertools.groupby(enumerate(sorted(indices)), lambda p: p[1] - p[0]):
        values = [v for _, v in group]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def tpu_commands(runs: Sequence[Run], launcher_args: Sequence[str]) -> list[list[list[str]]]:
    script = str(LAUNCH_DIR / "tpu_pod.sh")
    return [[[script, "run", *launcher_args, "--", *c] for c in run.commands()] for run in runs]


def run_forwarding_sigterm(command: list[str]) -> int:
    """Runs a command; a SIGTERM to the sweep reaches it (training checkpoints, then exits)."""
    process = subprocess.Popen(command)
    received = []

    def forward(signum, frame):
        received.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        status = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        raise SystemExit(128 + received[0])
    return status


def execute(jobs: Sequence[list[list[str]]], dry_run: bool) -> int:
    """Runs the jobs one after another, each a command list stopped by its first failure.

    Every job runs whatever the others do; a dry run prints the commands instead.
    """
    failed = []
    for i, job in enumerate(jobs):
        for command in job:
            if dry_run:
                print(shlex.join(command))
                continue
            print(f"[{i + 1}/{len(jobs)}] {shlex.join(command)}", file=sys.stderr, flush=True)
            if run_forwarding_sigterm(command) != 0:
                failed.append(i + 1)
                break
    if failed:
        print(f"cae-jax sweep: jobs {failed} of {len(jobs)} failed", file=sys.stderr)
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_file", nargs="?", help="Python file defining get_sweep()")
    parser.add_argument("--config", help="base config file every run starts from")
    parser.add_argument("--workdir", required=True, help="sweep directory (local, shared or gs://)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: one run after another here; slurm: one job array; tpu: one run after "
        "another on every worker of a TPU pod",
    )
    parser.add_argument(
        "--launcher-args",
        default="",
        help="options for launch/slurm.sh or launch/tpu_pod.sh run, as one string: "
        "--launcher-args='--nodes 2 --partition gpu' or --launcher-args='--name pod --zone z'",
    )
    parser.add_argument(
        "--test-data",
        default="",
        help="comma-separated prepared dirs: after training, each run evaluates its best "
        "checkpoint there (cae-jax evaluate) into RUN/test_metrics.json",
    )
    parser.add_argument("--test-split", default="test", help="split scored by --test-data")
    parser.add_argument("--only", help="comma list of run indices to launch (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--run-index", type=int, help="run this one run of DIR/sweep.json here (SLURM array tasks)"
    )


ACCEPTS_CONFIG_OVERRIDES = True  # Extra --config.a.b=v flags apply to every run of the sweep.


def run(args: argparse.Namespace) -> int:
    try:
        if args.run_index is not None:
            return _run_one(args.workdir, args.run_index)
        return _launch(args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"cae-jax sweep: {err}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace) -> int:
    if not args.sweep_file or not args.config:
        raise ValueError("give SWEEP_FILE and --config (or --run-index)")
    runs = expand(
        load_sweep(args.sweep_file),
        args.config,
        args.overrides,
        args.workdir,
        args.test_data,
        args.test_split,
    )
    plan = {
        "sweep_file": args.sweep_file,
        "config": args.config,
        "base_overrides": list(args.overrides),
        "runs": [dataclasses.asdict(r) for r in runs],
    }
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        unknown = wanted - {r.index for r in runs}
        if unknown:
            raise ValueError(f"--only names runs that don't exist: {sorted(unknown)}")
        runs = [r for r in runs if r.index in wanted]
    if not args.dry_run:
        write_plan(args.workdir, plan)
    print(f"sweep: {len(runs)} runs in {args.workdir} ({args.backend})", file=sys.stderr)
    launcher_args = shlex.split(args.launcher_args)
    if args.backend == "local":
        commands = local_commands(runs)
    elif args.backend == "slurm":
        commands = [[slurm_command(args.workdir, runs, launcher_args)]]
    else:
        commands = tpu_commands(runs, launcher_args)
    return execute(commands, args.dry_run)


def _run_one(workdir: str, index: int) -> int:
    runs = {r.index: r for r in read_runs(workdir)}
    if index not in runs:
        raise ValueError(f"{workdir} has no run {index} (runs 0..{len(runs) - 1})")
    from cae_jax import main

    for command in runs[index].commands():
        status = main.main(command)
        if status:
            return status
    return 0
