#!/usr/bin/env bash
# This machine: one process, or N cooperating processes (one per local GPU, or N CPU
# "hosts" for trying multi-host code) joined through a coordinator on 127.0.0.1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/local.sh [--dry-run] [options] -- CAE_JAX_ARGS...

  --processes N      processes to start (default 1: runs cae-jax directly)
  --per-gpu          process i drives local GPU i only (CAE_JAX_LOCAL_DEVICE_IDS=i)
  --cpu-devices K    run on CPU, K devices per process (JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES=K)
  --port P           coordinator port (default: a free port)
  --dry-run          print the commands instead of running them
The cae-jax command is $CAE_JAX, else this checkout's .venv/bin/cae-jax, else cae-jax on PATH.
USAGE
}

PROCESSES=1 PER_GPU=0 CPU_DEVICES="" PORT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) PROCESSES=$2; shift 2 ;;
    --per-gpu) PER_GPU=1; shift ;;
    --cpu-devices) CPU_DEVICES=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ $# -gt 0 ]] || die "give the cae-jax arguments after --"
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer"
CAE_JAX_BIN=$(default_cae_jax)

common_env=()
if [[ -n "$CPU_DEVICES" ]]; then
  common_env+=(JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$CPU_DEVICES")
fi
if ((PROCESSES == 1)); then
  run env ${common_env[@]+"${common_env[@]}"} "$CAE_JAX_BIN" "$@"
  exit
fi

if [[ -z "$PORT" ]]; then
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = 0; i < PROCESSES; i++)); do
  process_env=("${common_env[@]}" "CAE_JAX_COORDINATOR=127.0.0.1:$PORT"
    "CAE_JAX_NUM_PROCESSES=$PROCESSES" "CAE_JAX_PROCESS_ID=$i")
  if ((PER_GPU)); then process_env+=("CAE_JAX_LOCAL_DEVICE_IDS=$i"); fi
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command env "${process_env[@]}" "$CAE_JAX_BIN" "$@"
  else
    env "${process_env[@]}" "$CAE_JAX_BIN" "$@" &
    pids+=($!)
  fi
done
# The first process to fail stops the others (the trap), so no run hangs on a dead peer.
status=0
while ((${#pids[@]})); do
  finished=""
  if ! wait -n -p finished "${pids[@]}"; then status=1; break; fi
  remaining=()
  for pid in "${pids[@]}"; do [[ "$pid" == "$finished" ]] || remaining+=("$pid"); done
  pids=(${remaining[@]+"${remaining[@]}"})
done
exit "$status"
