#!/usr/bin/env bash
# The scale-out tables of docs/scale_out.md: `cae-jax compile` of one config for TPU slices
# and GPU hosts, one report directory per row, then `cae-jax compile-table` over them.
# Rows already reported are skipped, so a stopped sweep continues where it stopped.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/compile_sweep.sh OUT_DIR [CONFIG]

  OUT_DIR   one directory per row (report.json, report.md, compile.log), then
            compile_table.md and compile_scaling.png
  CONFIG    default configs/ffpp_c23.py, at batch 32 per chip
Rows: float32 and bfloat16 for v5e, v6e, v5p and tpu7x at 4, 16, 64 and 256 chips, and
H100, H200 and A100 hosts of 8; bfloat16 with mesh.fsdp=4 and with per-device BatchNorm at
256 chips; two v5e-256 slices; the largest batch on v5e-4.
The cae-jax command is $CAE_JAX, else this checkout's .venv/bin/cae-jax, else cae-jax on PATH.
USAGE
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { usage; exit 2; }
OUT=$1 CONFIG=${2:-$REPO_ROOT/configs/ffpp_c23.py}
CAE_JAX=$(default_cae_jax)
mkdir -p "$OUT"

row() {  # NAME TOPOLOGY [cae-jax compile arguments...]
  local name=$1 topology=$2
  shift 2
  [[ -f $OUT/$name/report.json ]] && return 0
  echo "$(date +%T) $name" >&2
  mkdir -p "$OUT/$name"
  "$CAE_JAX" compile --topology "$topology" --config "$CONFIG" --batch-per-chip 32 \
    --out "$OUT/$name" "$@" >"$OUT/$name/compile.log" 2>&1 \
    || echo "$(date +%T) $name failed: see $OUT/$name/compile.log" >&2
}

# Accelerator types as booked: v5e and v6e count chips, v5p and tpu7x TensorCores (2 a chip).
# The most telling rows first (a full-size compile takes minutes): each chip's smallest and
# largest slice, the GPU hosts, the choices at the largest slice, then the sizes between.
TPUS=(v5litepod:4:16:64:256 v6e:4:16:64:256 v5p:8:32:128:512 tpu7x:8:32:128:512)
BF16=--config.model.dtype=bfloat16
for spec in "${TPUS[@]}"; do
  kind=${spec%%:*} sizes=${spec#*:}
  row "$kind-${sizes%%:*}" "$kind-${sizes%%:*}"
  row "$kind-${sizes##*:}" "$kind-${sizes##*:}"
done
for gpu in h100 h200 a100; do
  row "$gpu-8" "$gpu-8"
  row "$gpu-8-bf16" "$gpu-8" "$BF16"
done
for spec in "${TPUS[@]}"; do
  largest=${spec%%:*}-${spec##*:}
  row "$largest-bf16" "$largest" "$BF16"
  row "$largest-bf16-fsdp4" "$largest" "$BF16" --config.mesh.fsdp=4
  row "$largest-bf16-bn1" "$largest" "$BF16" --config.model.bn_group=1
done
row v5litepod-256-bf16-x2 v5litepod-256 "$BF16" --slices 2
for spec in "${TPUS[@]}"; do
  kind=${spec%%:*} sizes=${spec#*:}
  for size in ${sizes//:/ }; do
    row "$kind-$size" "$kind-$size"
    row "$kind-$size-bf16" "$kind-$size" "$BF16"
  done
done
row v5litepod-4-bf16-max v5litepod-4 "$BF16" --max-batch

"$CAE_JAX" compile-table "$OUT" --out "$OUT"
