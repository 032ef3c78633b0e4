#!/usr/bin/env bash
# The accelerator benchmark on one GPU, in under 8 minutes: the full CAE at 299 (train step in
# bfloat16 and float32, inference, largest batch and its memory) beside PyTorch eager and
# torch.compile on the same GPU. Writes DIR/gpu_bench.json and DIR/gpu_bench.md.
# Needs jax (with CUDA), flax, optax, orbax, ml_collections, and torch for the peer;
# not TensorFlow or grain. Wheels missing on the machine can travel in WHEELS (see --help).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/gpu_bench.sh [--out-dir DIR] [--wheels DIR] [--limit-s S] [-- BENCH_ARGS...]

  --out-dir DIR   where gpu_bench.json and gpu_bench.md go (default: .)
  --wheels DIR    install the wheels in DIR (e.g. ml_collections) into a temporary
                  site folder first, without an index
  --limit-s S     stop the run after S seconds (default 470); rows stop starting
                  150 s before that (a row compiles and times both peers), and the
                  table so far is kept
  BENCH_ARGS      more `cae-jax bench` flags, e.g. --repeats 20, or --accelerator --smoke
                  to run the same rows tiny on a CPU
Python is $PYTHON, else python3; this checkout is put first on PYTHONPATH.
USAGE
}

OUT_DIR=. WHEELS="" LIMIT_S=470
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out-dir) OUT_DIR=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --limit-s) LIMIT_S=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$LIMIT_S" =~ ^[0-9]+$ && "$LIMIT_S" -gt 150 ]] || die "--limit-s must be more than 150"

PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$WHEELS" ]]; then
  site=$(mktemp -d)
  run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi
# JAX takes GPU memory as it needs it: the PyTorch peer shares the device.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
run timeout --signal=TERM "$LIMIT_S" "$PYTHON" -m cae_jax.main bench \
  --out "$OUT_DIR/gpu_bench.json" --markdown "$OUT_DIR/gpu_bench.md" \
  --budget-s $((LIMIT_S - 150)) "$@"
