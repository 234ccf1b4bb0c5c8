# remus — all set-up is cached under .cache/ and .venv/ (ignored by git).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .cache/.setup-stamp

.PHONY: setup test test-fast test-unit test-integration check demo fleet-demo bench fuzz soak install lab-down clean

# bin/setup is idempotent; the stamp only avoids re-running it when nothing changed.
$(STAMP): bin/setup pyproject.toml setup.py remus/checkpoint/_pagexor.c $(wildcard bin/criu-patches/*.patch)
	./bin/setup
	@mkdir -p .cache && touch $(STAMP)

setup: $(STAMP)

check: setup
	$(VENV)/bin/ruff check remus tests bench
	$(VENV)/bin/mypy

# The full proof (CI runs it): every tier, the long (`slow`) lab tests included.
test: setup
	$(VENV)/bin/ruff check remus tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests/unit
	$(VENV)/bin/pytest -q tests/integration tests/reliability

# A few minutes: lint and types (check), unit tests, the integration tests not marked `slow`.
test-fast: check
	$(VENV)/bin/pytest -q tests/unit
	$(VENV)/bin/pytest -q -m "not slow" tests/integration

test-unit: setup
	$(VENV)/bin/pytest -q tests/unit

test-integration: setup
	$(VENV)/bin/pytest -q tests/integration tests/reliability

demo: setup
	$(PY) bin/demo

# A fleet: two services on three hosts and a ZooKeeper, a power cut, protection back by itself.
fleet-demo: setup
	$(PY) bin/fleet-demo

bench: setup
	$(PY) bench/run.py $(BENCH_ARGS)

# >= 100 random power cuts, one JSON summary (bench/results/soak.json); ~25 minutes.
SOAK_ARGS ?= --cuts 100
soak: setup
	$(PY) bench/soak.py $(SOAK_ARGS)

# The protocol and store fuzzers at length (`make test` runs 150 examples each).
FUZZ_EXAMPLES ?= 5000
fuzz: setup
	REMUS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q tests/unit/test_fuzz_protocol.py \
	  --hypothesis-show-statistics

# remus outside the checkout: /opt/remus/venv, /usr/local/bin/remus, our CRIU,
# the systemd units (docs/systemd.md).
install: setup
	./bin/install

lab-down: setup
	./bin/remus lab down

clean:
	rm -rf $(VENV) .cache
