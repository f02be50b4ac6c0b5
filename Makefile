# skin-twin: the two quick-start commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
# No progress bars or telemetry from the tools in non-interactive runs.
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup browser run run-real ui repro test test-fast bench clean stack-up stack-down stack-status

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv from the lock file

run: setup  ## the main job: the Airflow DAG end to end on the project's own synthetic data
	$(BIN)/python -m pipeline.app.localrun

run-real: setup  ## the same job on real HAM10000 data with params-real.yaml (data in ../shared/data/ham10000-224)
	$(BIN)/python -m pipeline.app.localrun --params params-real.yaml

ui: setup  ## the Airflow UI on make run's metadata DB (project DAG folder, no example DAGs)
	$(BIN)/python -m pipeline.app.localrun ui

# The deployment in process mode: the services of docker/compose.yaml as local processes on an
# existing PostgreSQL and Redis, settings from $(STACK_ENV) (made once with fresh secrets).
STACK_ENV ?= docker/.env

$(STACK_ENV):
	$(BIN)/python -m pipeline.app.stack init-env $(STACK_ENV)

stack-up: setup $(STACK_ENV)  ## start the deployment as local processes; waits until every service answers
	$(BIN)/python -m pipeline.app.stack up --env-file $(STACK_ENV)

stack-down:  ## stop it (by process group); data stays in PostgreSQL and stack/
	$(BIN)/python -m pipeline.app.stack down --env-file $(STACK_ENV)

stack-status:  ## health of every service of the deployment
	$(BIN)/python -m pipeline.app.stack status --env-file $(STACK_ENV)

repro: setup  ## the same stages with DVC (data scientists' loop); dvc.yaml regenerated for params.yaml first
	$(BIN)/python -m pipeline dvc-yaml
	$(BIN)/dvc repro

# The browser tier (tests/test_audit.py) drives Debian's chromium headless; installed here when we
# may (root with apt-get), otherwise those tests skip and say why.
browser:  ## headless Chromium for the auditor's UI test (Debian package; needs root)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium not installed (needs root + apt-get): the browser tests will skip"; }

test: setup browser  ## all test tiers
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit and data-contract tests only
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup  ## speed benchmarks (quality: see bench/README.md)
	$(BIN)/python bench/pairs_bench.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf data models reports runs mlflow airflow_home .dvc/tmp .dvc/cache
