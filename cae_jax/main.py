"""The `cae-jax` command line: one entry point, one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Only the
module of the chosen subcommand is imported, so `cae-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cae_jax import accelerators, host_memory

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("data_prep.prepare", "raw videos/images -> face crops in sharded TFRecords"),
    "train": ("cae_jax.train", "train a model from a config file"),
    "evaluate": ("cae_jax.evaluate", "frame/video metrics of a checkpoint on prepared data"),
    "compare": ("cae_jax.compare", "paired bootstrap AUC difference of two models' scores"),
    "export": ("cae_jax.export", "training checkpoint -> inference bundle"),
    "predict": ("cae_jax.predict", "score images and videos with an exported model"),
    "serve": ("cae_jax.serve", "HTTP service of a bundle: TF Serving REST API, uploads, a page"),
    "demo": ("cae_jax.demo", "end-to-end run on built-in data (CPU)"),
    "bench": ("cae_jax.bench.cli", "speed benchmarks against peers"),
    "import-weights": ("cae_jax.weights", "ImageNet Xception weights (timm/keras) -> Orbax"),
    "sweep": ("cae_jax.sweep", "expand a sweep file into runs and launch them"),
    "sweep-report": ("cae_jax.sweep_report", "collect a sweep's results into one table"),
    "compile": ("cae_jax.aot_compile",
                "compile the train step for a TPU/GPU topology here: fit, cost, collectives"),
    "compile-table": ("cae_jax.compile_table",
                      "many `compile` reports as one table and a plot of images/s against chips"),
}
# Commands whose CPU runs the heap tuning (host_memory.py) speeds up: they train or time
# training, allocating and freeing gigabytes of activations every step.
HEAP_TUNED_COMMANDS = ("train", "bench", "demo")


def _tunes_heap(command: str | None) -> bool:
    return command in HEAP_TUNED_COMMANDS and host_memory.cpu_backend_expected()


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cae-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def cli() -> int:
    """The console script: CPU training commands restart once with the heap on huge pages
    (host_memory.py), then `main`."""
    accelerators.use_cpu_where_nothing_is_attached()  # Before the heap choice and JAX.
    if _tunes_heap(sys.argv[1] if len(sys.argv) > 1 else None):
        host_memory.restart_with_huge_pages()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    accelerators.use_cpu_where_nothing_is_attached()  # Before JAX starts.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if _tunes_heap(command):
        host_memory.retain_freed_memory()  # Before JAX starts its threads.
        huge = host_memory.HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "")
        print(f"cae-jax {command}: CPU run, freed host memory kept"
              + (", heap on huge pages" if huge else "") + " (host_memory.py; "
              "CAE_JAX_HUGE_PAGES=0 skips the huge pages)", file=sys.stderr)
    parser = build_parser(command)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    if rest and not getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(cli())
