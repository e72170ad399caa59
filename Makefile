# Two entry points, both self-contained on a fresh machine:
#   make demo   -> creates/reuses .venv, installs finegrain, runs the demo on the built-in world
#   make test   -> creates/reuses .venv, installs finegrain[dev], runs the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.finegrain-installed

.PHONY: demo test test-slow lint bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build of this exact release installs without a multi-GB download
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finegrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/finegrain bench

clean-venv:
	rm -rf $(VENV)
