# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev run test lint unit integration e2e asyncapi bench bench-peers chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)  ## what running needs (about 6.1 GB, see the README)

install-dev: $(DEV_STAMP)  ## plus the test, lint and benchmark tools

run: install  ## api + projector + trainer in one process on SQLite under ./var
	$(BIN)/heimdall up

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: lint  ## every test; integration tests need PostgreSQL and RabbitMQ on localhost
	$(BIN)/pytest -q -p no:cacheprovider

unit: install-dev
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

integration: install-dev
	$(BIN)/pytest -q -p no:cacheprovider tests/integration

e2e: install-dev
	$(BIN)/pytest -q -p no:cacheprovider tests/e2e

asyncapi: install  ## regenerate docs/asyncapi.json from the real subscribers
	$(BIN)/python -m services.asyncapi > docs/asyncapi.json

bench: install-dev  ## every benchmark (about 15 min; needs PostgreSQL and RabbitMQ), then docs/BENCHMARKS.md
	$(BIN)/python -m bench.run_all --out docs/BENCHMARKS.md

PEERS := .venv-peers
bench-peers: install-dev  ## the api against MLflow's tracking server (its own venv; about 5 min)
	test -x $(PEERS)/bin/mlflow || { $(PYTHON) -m venv $(PEERS) && $(PEERS)/bin/pip install -q "mlflow==3.17.0" "psycopg[binary]"; }
	$(BIN)/python -m bench.run_all --only peers --out docs/BENCHMARKS.md

chaos: install-dev  ## faults at random moments while jobs train and clients watch (TRIALS=100, about 25 min)
	mkdir -p var && $(BIN)/python -m tests.chaos.run --trials $${TRIALS:-100} --json var/chaos.json --out docs/CHAOS.md

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
