# The two commands of the README: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint unit integration e2e asyncapi bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install  ## api + projector + trainer in one process on SQLite under ./var
	$(BIN)/heimdall up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: lint  ## every test; integration tests need PostgreSQL and RabbitMQ on localhost
	$(BIN)/pytest -q -p no:cacheprovider

unit: install
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

integration: install
	$(BIN)/pytest -q -p no:cacheprovider tests/integration

e2e: install
	$(BIN)/pytest -q -p no:cacheprovider tests/e2e

asyncapi: install  ## regenerate docs/asyncapi.json from the real subscribers
	$(BIN)/python -m shared.rabbit > docs/asyncapi.json

bench: install  ## every benchmark (about 15 min; needs PostgreSQL and RabbitMQ), then docs/BENCHMARKS.md
	$(BIN)/python -m bench.run_all --out docs/BENCHMARKS.md

chaos: install  ## faults at random moments while jobs train and clients watch (TRIALS=100, about 25 min)
	mkdir -p var && $(BIN)/python -m tests.chaos.run --trials $${TRIALS:-100} --json var/chaos.json --out docs/CHAOS.md

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
