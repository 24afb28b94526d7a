# Millstream: `make demo` runs the stack on embedded defaults, `make test` runs the suite.
# Both install what they need (a virtualenv in .venv, Debian packages when run as root).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

DEVICES  ?= 10
DURATION ?= 0
PORT     ?= 8000
HISTORY  ?= 12h

# The suite runs on every core (pytest-xdist; each worker starts its own brokers and
# servers on free ports); JOBS=1 runs it in one process, as `pytest` alone does.
JOBS ?= auto

BENCHES := $(patsubst bench/%.py,%,$(filter-out bench/_%,$(wildcard bench/*.py)))

.PHONY: help venv system-deps test test-fast check lint format demo bench clean stack stack-down $(addprefix bench-,$(BENCHES))

help:
	@echo "make demo    run broker + cloud + a simulated fleet (DEVICES=10 DURATION=0 PORT=8000 HISTORY=12h)"
	@echo "make test    install what is needed and run the whole test suite"
	@echo "make check   ruff (lint + format) and mypy"
	@echo "make bench   run every benchmark under bench/ (JSON in bench/results/)"

$(STAMP): edge-agent/pyproject.toml cloud-service/pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e 'edge-agent[all]' -e 'cloud-service[test]' -r requirements-dev.txt
	touch $@

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

test: system-deps venv
	$(PY) -m pytest -n $(JOBS) $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -n $(JOBS) -m "not slow" $(PYTEST_ARGS)

check: venv
	$(BIN)/ruff check edge-agent cloud-service tests bench scripts
	$(BIN)/ruff format --check edge-agent cloud-service tests bench scripts
	$(BIN)/mypy --config-file edge-agent/pyproject.toml edge-agent/src
	$(BIN)/mypy --config-file cloud-service/pyproject.toml cloud-service/src
	$(PY) scripts/check_secrets.py

format: venv
	$(BIN)/ruff check --fix edge-agent cloud-service tests bench scripts
	$(BIN)/ruff format edge-agent cloud-service tests bench scripts

demo: system-deps venv
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || $(BIN)/pip install -q amqtt
	$(PY) scripts/demo.py --devices $(DEVICES) --duration $(DURATION) --port $(PORT) --history $(HISTORY)

bench: system-deps venv
	@mkdir -p bench/results
	@set -e; for b in $(BENCHES); do echo "== bench $$b"; $(PY) bench/$$b.py; done

$(addprefix bench-,$(BENCHES)): bench-%: system-deps venv
	@mkdir -p bench/results
	$(PY) bench/$*.py

stack:  # the full stack with docker compose (needs a container engine): docs/deploy.md
	sh deploy/scripts/stack.sh up

stack-down:
	sh deploy/scripts/stack.sh down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache millstream-data var
