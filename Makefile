# Two commands matter: `make run` (the local stack) and `make test` (everything CI runs).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= deploy/demo/asc.yaml
DEMO_KEY ?= sk-asc-demo-acme-key
DEMO_MODEL ?= gpt-4o-mini
# A second stack beside the first (docs/quickstart.md, "Busy ports"): every port and the
# work directory can be chosen. Empty REDIS_PORT / EMULATOR_PORT: the ports in CONFIG.
WORKDIR ?= var/run
LISTEN_PORT ?= 10000
EXTPROC_PORT ?= 50051
METRICS_PORT ?= 9464
REDIS_PORT ?=
EMULATOR_PORT ?=
# 0: start the stack's Redis empty each time (default: its data is kept in WORKDIR).
REDIS_PERSIST ?= 1
# `make openbao`: a local OpenBao dev server for the Transit KEK (docs/credentials.md).
BAO_PORT ?= 8200
BAO_DIR ?= var/openbao

.PHONY: install run openbao test lint typecheck unit integration soak test-fast-path bench bench-peers \
	redis-server wrk valgrind node kubectl clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# xds-protos ships its own older copy of opentelemetry/proto/*, in the same files as
	@# opentelemetry-proto: whichever pip installs last wins. The OTLP exporter needs the
	@# newer one (docs/decisions/0086-opentelemetry-proto-over-xds-protos-copy.md).
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
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

valgrind:
	@command -v callgrind_control >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }

STACK_FLAGS = --config $(CONFIG) --workdir $(WORKDIR) --listen-port $(LISTEN_PORT) \
	--extproc-port $(EXTPROC_PORT) --metrics-port $(METRICS_PORT) --demo-model $(DEMO_MODEL) \
	$(if $(REDIS_PORT),--redis-port $(REDIS_PORT)) \
	$(if $(EMULATOR_PORT),--emulator-port $(EMULATOR_PORT)) \
	$(if $(filter 0,$(REDIS_PERSIST)),--no-redis-persist) \
	$(if $(filter deploy/demo/%,$(CONFIG)),--demo-key $(DEMO_KEY))

# kubectl for `kubectl kustomize` (tests/deploy renders deploy/k8s): from PATH, else
# Debian's kubernetes-client (docs/decisions/0095-kustomize-from-kubectl.md).
kubectl:
	@command -v kubectl >/dev/null 2>&1 || { \
		echo "kubectl missing: installing Debian's kubernetes-client"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client; }

run: install redis-server
	@exec $(BIN)/python -m extproc.devstack $(STACK_FLAGS)

openbao: install
	@exec $(BIN)/python -m extproc.devbao --port $(BAO_PORT) --dir $(BAO_DIR)

lint: install
	$(BIN)/ruff check extproc tests bench

typecheck: install
	$(BIN)/mypy --strict extproc

unit: install
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# --durations: the slowest tests, to keep the whole `make test` within its 15 minutes.
integration: install redis-server kubectl
	$(BIN)/pytest -q -p no:cacheprovider --durations=15 -m "not soak" tests/integration \
		tests/e2e tests/docs tests/deploy tests/reliability

# The reliability suite's longer runs (docs/reliability.md): a 30 s rotation drill,
# Envoy at trace, more fuzzing. Each prints its FIGURE lines.
soak: install redis-server test-fast-path
	$(BIN)/pytest -q -s -p no:cacheprovider -m soak tests/reliability
	ASC_AUDIT_QUERY_RECORDS=1000000 $(BIN)/pytest -q -p no:cacheprovider \
		tests/integration/test_audit_query.py

# The e2e suites' private stacks again, each with the fast path on (decision 0136): about
# 7 more minutes on 2 cores, so not in `make test`. There the shared-gateway suites and
# the private-stack tests whose requests take the fast path (marked `both_paths`) run on
# both paths; the other private stacks' requests never take it.
test-fast-path: install redis-server
	ASC_TEST_PATH=fast $(BIN)/pytest -q -p no:cacheprovider -m "not soak" tests/e2e \
		-k "not full]"

# Fast checks first, then the slow real-process suites. pytest exits 5 when it collects
# nothing; that fails the target like any other non-zero exit.
test: lint typecheck unit integration

# The peers live outside the project venv: LiteLLM in its own venv, Portkey under
# bench/node_modules (both pinned, both git-ignored).
BENCH_STAMP := $(VENV)/.bench-installed
LITELLM_VENV := bench/.venv-litellm

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

node:
	@command -v npm >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }

$(LITELLM_VENV)/.installed: bench/requirements-litellm.txt
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet -r bench/requirements-litellm.txt
	touch $@

bench/node_modules/.installed: bench/package.json
	npm install --prefix bench --no-audit --no-fund --silent
	touch $@

bench-peers: node $(LITELLM_VENV)/.installed bench/node_modules/.installed

# BENCH_ARGS: flags for bench/run.py, e.g. BENCH_ARGS="--duration 5" or "--no-peers".
BENCH_ARGS ?=

bench: install redis-server wrk valgrind $(BENCH_STAMP) bench-peers
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/envoy_instructions.py
	$(BIN)/python bench/streaming.py
	$(BIN)/python bench/keys.py
	$(BIN)/python bench/failover.py
	$(BIN)/python bench/fastpath.py
	$(BIN)/python bench/door_floor.py
	$(BIN)/python bench/guardrails.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
