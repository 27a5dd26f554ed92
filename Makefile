# Two commands do all set-up on a fresh machine (see README.md):
#   make up     run taskwheel (all three services, embedded store) on 127.0.0.1:7070
#   make test   install everything, then run the whole test suite (starts its own Cassandra)
# Others: make bench (core micro-benchmarks), make bench-e2e (taskwheel beside Celery, the
# figures of docs/performance.md), make proto (regenerate the gRPC code), make clean.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py core/*.pyx core/*.pxd $(wildcard services/*/*.pyx services/*/*.pxd services/*/*/*.pyx services/*/*/*.pxd) 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: up test bench bench-e2e proto system-deps clean

$(STAMP):
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel "Cython>=3.0"
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

# Java 17 and Maven run the development Cassandra; docker-compose validates docker-compose.yml;
# SQLite's header and library build the core's reader of the embedded store.
system-deps:
	@command -v java >/dev/null && command -v mvn >/dev/null && command -v gcc >/dev/null && command -v docker-compose >/dev/null && [ -f /usr/include/sqlite3.h ] || \
	  { apt-get update -q && apt-get install -y -q openjdk-17-jre-headless maven gcc python3-venv docker-compose libsqlite3-dev; }

up: $(STAMP)
	$(BIN)/taskwheel up --data-dir ./taskwheel-data --listen 127.0.0.1:7070

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python -m pytest perf/bench_core.py --benchmark-only --benchmark-json=perf/results/core.json

# Both systems on the same scenarios, one after the other, in one run (see docs/performance.md).
bench-e2e: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,peer]'
	perf/peers/setup.sh
	for s in steady spike top_of_minute; do \
	  $(BIN)/python perf/run_bench.py --driver taskwheel --driver celery --scenario $$s --out perf/results/ || exit 1; \
	done

proto: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf build *.egg-info core/*.c core/*.so $(VENV)
	find services -name "*.c" -o -name "*.so" | xargs rm -f
