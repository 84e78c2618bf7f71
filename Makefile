# Email Router for Dynamics 365 — developer entry points.
# `make run` and `make test` install whatever is missing (venv, pip packages, Azurite via npm).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
# Test workers (pytest-xdist): 2 suits 2 cores, since the whole-stack suites mostly wait while the fuzz suites
# compute; tests sharing a module's or the chaos suites' stack stay on one worker (tests/conftest.py).
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: run test test-fast lint bench demo chaos reset install clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(NPM_STAMP)

install: $(STAMP) $(NPM_STAMP) browser

# Debian's chromium + chromium-driver for the status-page test (tests/integration/test_status_page.py drives it
# with selenium; browser downloads are impossible offline). Quiet and idempotent: apt runs only when one is missing.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium and chromium-driver (status-page browser test)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver; } >/dev/null 2>&1 || echo "apt-get could not install chromium"; \
	  else \
	    echo "chromium/chromedriver missing and apt-get is not usable here: the status-page browser test is skipped"; \
	  fi; \
	fi

run: install
	$(PY) -m local.stack up --live

test: install
	$(PY) -m pytest $(PYTEST_PARALLEL)

test-fast: install
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow"

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) -m bench

demo: install
	$(PY) -m local.demo

chaos: install
	$(PY) -m pytest -m chaos --chaos-full

reset:
	rm -rf .local

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
