# Warlock: `make run` starts the stack on this machine, `make cluster` a cluster of it (3 NATS nodes,
# 2 APIs on PostgreSQL, 2 gateways), `make test` runs every gate and test.
# Both create or update the virtual environment first; only python3 and make are needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run cluster test lint typecheck pytest bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# the distribution was called warlock before 0.1.0 (a name PyPI gives to an unrelated project)
	@$(BIN)/python -m pip uninstall --quiet --yes warlock >/dev/null 2>&1 || true
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/warlock run

cluster: $(STAMP)
	$(BIN)/warlock run --cluster

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .warlock .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
