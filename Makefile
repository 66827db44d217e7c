# v3flow: `make run` (the whole pipeline on configs/tiny.yaml) and `make test` (the test suite) do all the
# set-up on a fresh machine with Python 3.11. Servers: `make up` / `make down`; deployments: `make serve`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/tiny.yaml
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test e2e up down status serve bench clean

setup: $(STAMP)

# Reinstall when the dependency list changes. torch is pinned to 2.13.0 (a CPU wheel here; see pyproject).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: setup
	$(BIN)/v3flow run $(CONFIG) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

# Browser check of the Prefect UI (not in CI): Debian's chromium driven by Playwright.
e2e: setup
	bash tests/e2e/run.sh

up: setup
	$(BIN)/v3flow up

down:
	@if [ -x $(BIN)/v3flow ]; then $(BIN)/v3flow down; fi

status: setup
	$(BIN)/v3flow status

serve: setup
	$(BIN)/v3flow serve

bench: setup
	$(BIN)/python benchmarks/data_throughput.py --config $(CONFIG)
	$(BIN)/python benchmarks/model_speed.py --config $(CONFIG)
	$(BIN)/python benchmarks/pretrain_speed.py --config $(CONFIG)

clean: down
	rm -rf .v3flow data/outputs
