#!/usr/bin/env bash
# Cloud TPU VM pods: create, install this checkout, run cae-jax on every worker, follow logs,
# delete. Every host runs the same command; jax.distributed finds the pod by itself.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh [--dry-run] COMMAND --name TPU --zone ZONE [--project ID] [options]

  create   --accelerator-type TYPE [--version RUNTIME] [--spot]   make the TPU VM (pod slice)
  install  [--ref GIT_REF] [--python VERSION]     copy `git archive REF` to ~/cae-jax on every
           worker and install it with jax[tpu] into ~/cae-jax/.venv
  run      [--detach] [--env KEY=VALUE]... -- CAE_JAX_ARGS...     run `cae-jax ARGS` on all
           workers; --detach leaves it running and writes ~/cae-jax.log on each worker
  logs     [--worker N]                           follow ~/cae-jax.log of a detached run
  delete                                          delete the TPU VM

  --dry-run   print the exact commands instead of running them

  Multislice (several slices over DCN, created as one queued resource): see
  docs/scale_out.md, "Multislice"; train with --config.mesh.slices=N.
USAGE
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
if [[ "$1" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
COMMAND=$1
shift
case "$COMMAND" in
  -h|--help) usage; exit 0 ;;
  create|install|run|logs|delete) ;;
  *) die "unknown command '$COMMAND' (create, install, run, logs, delete)" ;;
esac

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base" SPOT=0
REF="HEAD" PYTHON_VERSION="3.11" DETACH=0 WORKER=0 ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --accelerator-type) ACCELERATOR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --ref) REF=$2; shift 2 ;;
    --python) PYTHON_VERSION=$2; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --worker) WORKER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
need "$NAME" --name
need "$ZONE" --zone

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then WHERE+=(--project="$PROJECT"); fi

# on_workers WORKER REMOTE_COMMAND: runs a shell command over ssh on the given worker(s).
on_workers() {
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

case "$COMMAND" in
  create)
    need "$ACCELERATOR" --accelerator-type
    extra=()
    if ((SPOT)); then extra+=(--spot); fi
    run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${extra[@]}"
    ;;
  install)
    tarball=${TMPDIR:-/tmp}/cae-jax-$NAME.tar.gz
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "$REF"
    run "${GCLOUD[@]}" scp "$tarball" "$NAME:cae-jax.tar.gz" "${WHERE[@]}" --worker=all
    # uv brings its own CPython $PYTHON_VERSION: TPU VM images ship an older python3.
    on_workers all "set -e; mkdir -p ~/cae-jax && tar -xzf ~/cae-jax.tar.gz -C ~/cae-jax \
&& cd ~/cae-jax && python3 -m pip install --user --quiet uv \
&& ~/.local/bin/uv venv --allow-existing --python $PYTHON_VERSION .venv \
&& ~/.local/bin/uv pip install --python .venv/bin/python -c constraints.txt -e . 'jax[tpu]'"
    ;;
  run)
    [[ $# -gt 0 ]] || die "run needs the cae-jax arguments after --"
    remote="cd ~/cae-jax && env"
    for word in ${ENVS[@]+"${ENVS[@]}"} .venv/bin/cae-jax "$@"; do remote+=" $(quote "$word")"; done
    if ((DETACH)); then
      remote="nohup sh -c $(quote "$remote") > ~/cae-jax.log 2>&1 < /dev/null &"
    fi
    on_workers all "$remote"
    ;;
  logs)
    on_workers "$WORKER" "tail -n +1 -F ~/cae-jax.log"
    ;;
  delete)
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
