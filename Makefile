# Every target sets up its environment itself on a fresh machine.
#
# Two supported stacks (README, "Install"):
#   newest  Python 3.13 (else 3.12), constraints-newest.txt: what `pip install` gives a new user
#   oldest  Python 3.11, constraints.txt: the oldest versions supported
# STACK picks one; the default is newest where such a Python is found (on PATH or in pyenv),
# else oldest. `make test STACK=oldest` runs the other; .ci/run runs both.
NEWEST_PYTHON := $(shell for v in 3.13 3.12; do \
  p=$$(PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -x "$$v\.[0-9]*" | tail -1) \
       pyenv which python 2>/dev/null || command -v python$$v); \
  [ -n "$$p" ] && "$$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null \
    && { echo "$$p"; break; }; done)
STACK ?= $(if $(NEWEST_PYTHON),newest,oldest)
ifeq ($(STACK),newest)
PYTHON      ?= $(NEWEST_PYTHON)
VENV        := .venv
CONSTRAINTS := constraints-newest.txt
# No `bench` extra: PyPI's torch for Python 3.12+ is the multi-GB CUDA build (README).
EXTRAS      := test,tpu-compile,cuda-compile
else ifeq ($(STACK),oldest)
PYTHON      ?= python3.11
VENV        := .venv-oldest
CONSTRAINTS := constraints.txt
# No `cuda-compile`: jax 0.10.2's CUDA plugin prints its "no cuda drivers" lines in every
# CPU process, JAX_PLATFORMS=cpu or not (the newest's is quiet); `compile` targets TPUs here.
EXTRAS      := test,bench,tpu-compile
else
$(error STACK must be newest or oldest, got '$(STACK)')
endif
BIN    := $(VENV)/bin
WORKDIR ?= runs/demo
# pytest-xdist processes; each test file runs whole on one of them (its fixtures shared).
TEST_WORKERS ?= 2

.PHONY: install test lint demo bench constraints-newest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@[ -n "$(PYTHON)" ] || { echo "make: STACK=newest needs Python 3.12+ (python3.13 on PATH or in pyenv); STACK=oldest uses python3.11" >&2; exit 1; }
	@echo "make: STACK=$(STACK): $(VENV) on $$($(PYTHON) --version) with $(CONSTRAINTS)"
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --numprocesses $(TEST_WORKERS) --dist loadfile --durations=15

# ruff's rules only: the code is wrapped by hand (big_vision's style), not by a formatter.
lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/cae-jax demo --workdir $(WORKDIR)

# The PyTorch peers need torch, which the oldest stack installs (its CPU build).
bench:
	$(MAKE) STACK=oldest install
	.venv-oldest/bin/cae-jax bench --out bench.json

# Run deliberately: re-resolves the newest versions the ranges in pyproject.toml allow on the
# newest Python, installs them into a scratch venv and pins them in constraints-newest.txt
# (jax[tpu]: libtpu at the version that jax pins).
constraints-newest:
	@[ -n "$(NEWEST_PYTHON)" ] || { echo "make: needs Python 3.12+ (python3.13 on PATH or in pyenv)" >&2; exit 1; }
	rm -rf .venv-resolve
	$(NEWEST_PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install --quiet --upgrade pip
	.venv-resolve/bin/python -m pip install --quiet -e '.[test,tpu-compile,cuda-compile]' 'jax[tpu]'
	V=$$(.venv-resolve/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	{ echo "# Exact versions tested together on Python $$V (pip -c): the newest the ranges in pyproject.toml"; \
	  echo "# allowed on $$(date -u +%F). Refresh: make constraints-newest (then run make test)."; \
	  .venv-resolve/bin/python -m pip freeze --all --exclude-editable | grep -v "^pip==" \
	    | sed "s/\$$/ ; python_version == \"$$V\"/"; } > constraints-newest.txt
	rm -rf .venv-resolve

clean:
	rm -rf .venv .venv-oldest .venv-resolve runs bench.json
