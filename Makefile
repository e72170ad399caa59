# Two entry points, both self-contained on a fresh machine:
#   make demo   -> creates/reuses .venv, installs finegrain with the locked versions, runs the demo on the built-in world
#   make test   -> creates/reuses .venv, installs finegrain[dev] with the locked versions, runs the default test suite
#
# requirements/lock.txt pins every package at the version the test suite passed with (pip constraints), so a fresh
# machine installs what was tested. pyproject.toml keeps honest ranges for library users.
#   make test-latest -> a separate .venv-latest with the newest versions the ranges allow: shows drift before users meet it
#   make lock        -> test-latest, then rewrite requirements/lock.txt from .venv-latest (only if the tests passed)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.finegrain-installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
# torch first, pinned: a CPU build of this exact release installs without a multi-GB download
TORCH := torch==2.13.0

.PHONY: demo test test-slow test-latest lock lint bench clean-venv

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finegrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The newest versions pyproject's ranges allow, in a venv of their own (rebuilt every time: "newest" moves).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)" -e ".[dev]"
	$(LATEST)/bin/python -m pip list --format=freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# Refresh the lock: the versions test-latest installed, once its tests passed (torch's local "+cpu" label dropped,
# so the lock also means the same release on machines whose torch comes from PyPI).
lock: test-latest
	@mkdir -p requirements
	@{ echo "# Constraints: the exact versions the test suite passed with (Python 3.11, Linux x86_64)."; \
	   echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d); used by 'make test' and 'make demo' (pip install -c)."; \
	   sed -e 's/+cpu$$//' $(LATEST)/versions.txt | grep -v '^finegrain=='; } > $(LOCK)
	@echo "wrote $(LOCK) ($$(grep -c '==' $(LOCK)) packages)"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/finegrain bench

clean-venv:
	rm -rf $(VENV) $(LATEST)
