# Every target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
WORKDIR ?= runs/demo
# pytest-xdist processes; each test file runs whole on one of them (its fixtures shared).
TEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

# bench: torch, the PyTorch peer of `make bench` (the test extra takes it too: timm parity).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[tpu-compile,cuda-compile]'
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --numprocesses $(TEST_WORKERS) --dist loadfile --durations=15

# ruff's rules only: the code is wrapped by hand (big_vision's style), not by a formatter.
lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/cae-jax demo --workdir $(WORKDIR)

bench: install
	$(BIN)/cae-jax bench --out bench.json

clean:
	rm -rf $(VENV) runs bench.json
