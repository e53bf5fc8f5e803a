# Two commands matter: `make run` (the local stack) and `make test` (everything CI runs).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/demo/asc.yaml
DEMO_KEY ?= sk-asc-demo-acme-key
DEMO_MODEL ?= gpt-4o-mini

.PHONY: install run test lint typecheck unit integration bench redis-server wrk clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# redis-server from PATH, else Debian's package (CI runs as root on Debian).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server missing: installing Debian's redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

wrk:
	@command -v wrk >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

run: install redis-server
	@if [ "$(CONFIG)" = "deploy/demo/asc.yaml" ]; then \
		exec $(BIN)/python -m extproc.devstack --config $(CONFIG) --demo-key $(DEMO_KEY) --demo-model $(DEMO_MODEL); \
	else \
		exec $(BIN)/python -m extproc.devstack --config $(CONFIG) --demo-model $(DEMO_MODEL); \
	fi

lint: install
	$(BIN)/ruff check extproc tests bench

typecheck: install
	$(BIN)/mypy --strict extproc

unit: install
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

integration: install redis-server
	$(BIN)/pytest -q -p no:cacheprovider tests/integration tests/e2e tests/docs

# Fast checks first, then the slow real-process suites. pytest exits 5 when it collects
# nothing; that fails the target like any other non-zero exit.
test: lint typecheck unit integration

bench: install redis-server wrk
	$(BIN)/python bench/run.py
	$(BIN)/python bench/streaming.py
	$(BIN)/python bench/keys.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
