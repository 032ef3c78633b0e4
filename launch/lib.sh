# shellcheck shell=bash
# Shared by the launchers (sourced): dry-run aware execution and argument checks.

DRY_RUN=${DRY_RUN:-0}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Runs a command, or with DRY_RUN=1 prints it shell-quoted, ready to copy and paste.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "$@"
  else
    "$@"
  fi
}

print_command() {
  local words=() arg
  for arg in "$@"; do words+=("$(quote "$arg")"); done
  echo "${words[*]}"
}

# quote WORD: the word as the shell reads it back; plain when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ && "$1" != '~'* ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need VALUE FLAG: fails with a message when a required flag was not given.
need() {
  [[ -n "$1" ]] || die "$2 is required (see --help)"
}

# The cae-jax command: $CAE_JAX, else the checkout's .venv, else the one on PATH.
default_cae_jax() {
  if [[ -n "${CAE_JAX:-}" ]]; then
    echo "$CAE_JAX"
  elif [[ -x "$REPO_ROOT/.venv/bin/cae-jax" ]]; then
    echo "$REPO_ROOT/.venv/bin/cae-jax"
  else
    echo cae-jax
  fi
}
