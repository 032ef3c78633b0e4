#!/usr/bin/env bash
# Multi-node GPU training under SLURM: submits launch/slurm.sbatch, one process per node (all
# its GPUs) or one per GPU. Data and workdir must be on a shared filesystem or GCS.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/slurm.sh [--dry-run] [options] -- CAE_JAX_ARGS...

  --nodes N            nodes (default 1)
  --gpus-per-node G    GPUs on each node (default 8)
  --per node|gpu       one process per node driving all G GPUs, or one per GPU (default node)
  --time HH:MM:SS      wall-clock limit (default 24:00:00)
  --partition NAME     SLURM partition
  --account NAME       SLURM account
  --job-name NAME      job name (default cae-jax)
  --array SPEC         job array, e.g. 0-11%4 (sweeps: each task runs one run)
  --output PATTERN     log file pattern (default slurm-%x-%j.out, arrays slurm-%x-%A_%a.out)
  --sbatch-arg ARG     any other sbatch option, verbatim (repeatable)
  --dry-run            print the sbatch command instead of submitting it
The cae-jax command is $CAE_JAX, else this checkout's .venv/bin/cae-jax, else cae-jax on PATH.
USAGE
}

NODES=1 GPUS=8 PER=node TIME=24:00:00 PARTITION="" ACCOUNT="" JOB_NAME=cae-jax ARRAY="" OUTPUT=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES=$2; shift 2 ;;
    --gpus-per-node) GPUS=$2; shift 2 ;;
    --per) PER=$2; shift 2 ;;
    --time) TIME=$2; shift 2 ;;
    --partition) PARTITION=$2; shift 2 ;;
    --account) ACCOUNT=$2; shift 2 ;;
    --job-name) JOB_NAME=$2; shift 2 ;;
    --array) ARRAY=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    --sbatch-arg) EXTRA+=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ $# -gt 0 ]] || die "give the cae-jax arguments after --"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "--gpus-per-node must be an integer, got '$GPUS'"
case "$PER" in
  node) TASKS_PER_NODE=1 ;;
  gpu) ((GPUS > 0)) || die "--per gpu needs --gpus-per-node > 0"; TASKS_PER_NODE=$GPUS ;;
  *) die "--per must be node or gpu, got '$PER'" ;;
esac
if [[ -z "$OUTPUT" ]]; then
  if [[ -n "$ARRAY" ]]; then OUTPUT="slurm-%x-%A_%a.out"; else OUTPUT="slurm-%x-%j.out"; fi
fi

sbatch_args=(--job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE"
  --time="$TIME" --output="$OUTPUT" --export="ALL,CAE_JAX=$(default_cae_jax)")
if ((GPUS > 0)); then sbatch_args+=(--gpus-per-node="$GPUS"); fi
if [[ -n "$PARTITION" ]]; then sbatch_args+=(--partition="$PARTITION"); fi
if [[ -n "$ACCOUNT" ]]; then sbatch_args+=(--account="$ACCOUNT"); fi
if [[ -n "$ARRAY" ]]; then sbatch_args+=(--array="$ARRAY"); fi
run sbatch "${sbatch_args[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "$REPO_ROOT/launch/slurm.sbatch" "$@"
