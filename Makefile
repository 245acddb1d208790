# AutoRetrain developer entry points. Everything installs into .venv from nothing.
#   make demo   create .venv, install, run the demo on embedded defaults
#   make test   create/update .venv with dev extras, lint, run the whole suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
UV_VERSION := 0.13.9
DEMO_ROOT ?= .autoretrain/demo

.PHONY: help venv dev demo test stack-test lint format bench constraints clean

help:
	@echo "make demo        install and run the demo (local storage, SQLite, CPU)"
	@echo "make test        install dev extras, lint, run the whole test suite"
	@echo "make lint        ruff, the layer contracts (import-linter) and mypy"
	@echo "make stack-test  the compose stack's services as processes run whole cycles (in make test too)"
	@echo "make bench       run the benchmarks (results go to docs/benchmarks.md)"
	@echo "make constraints re-resolve and re-pin constraints.txt"

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"

# The stamp files make re-runs cheap: reinstall only when the pins change.
$(VENV)/.installed: $(UV) pyproject.toml constraints.txt
	$(UV) pip install --python $(BIN)/python -c constraints.txt -e .
	@touch $@

$(VENV)/.installed-dev: $(UV) pyproject.toml constraints.txt
	$(UV) pip install --python $(BIN)/python -c constraints.txt -e ".[dev]"
	@touch $(VENV)/.installed $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: venv
	$(BIN)/autoretrain demo --root $(DEMO_ROOT)

lint: dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# Two workers: most slow tests (a cycle, a DAG run) keep one core busy, so two share the
# machine's cores. --dist loadscope keeps a module's (or a class's) tests on one worker, so its
# fixtures are built once; tests/conftest.py puts modules with slow tests first, and
# --no-loadscope-reorder keeps that order.
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder \
		$(PYTEST_ARGS)

# Needs PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis on 6379, as in CI.
stack-test: dev
	$(BIN)/python -m pytest tests/devtools/test_service_stack.py $(PYTEST_ARGS)

bench: dev
	$(UV) pip install --python $(BIN)/python -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python benchmarks/run_all.py

# Re-resolve from pyproject.toml and pin every version (as Airflow recommends).
constraints: $(UV)
	$(UV) pip compile --python $(BIN)/python --python-version 3.11 --all-extras \
		--no-header --no-annotate -o constraints.txt pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
