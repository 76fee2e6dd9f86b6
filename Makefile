# The whole developer interface of Postier. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= postier-data
PYTEST_ARGS ?=
# Test processes. Most tests wait on servers and relays more than they compute, so two
# finish the suite in well under half the time on two cores; 0 runs it in this process.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install run services test test-fast lint bench soak screenshots clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Postier needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
# Dovecot for the IMAP tests, which start a private one; the package's own service would
# serve IMAP on ports 143 and 993 of this machine: it is stopped and left off.
	command -v dovecot >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dovecot-imapd && { systemctl disable --now dovecot.socket dovecot.service 2>/dev/null || true; })
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install Postier with everything its tests need

run: install ## Start the server on the embedded SQLite store (data in ./postier-data)
	$(BIN)/postier serve --data-dir $(DATA_DIR)

services: ## Start PostgreSQL for the tests (installing it if needed)
	bash scripts/ensure-postgres.sh

test: install services ## Run the whole test suite (SQLite and PostgreSQL)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-fast: install ## Unit tests only
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

lint: install ## ruff and mypy (strict on src/)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: install services ## Benchmarks against Postfix and the Python ceiling (bench/results/, docs/performance.md)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

soak: install services ## Long fault run: kills and relay outages for SOAK_MINUTES (default 10)
	$(BIN)/python bench/soak.py --minutes $(or $(SOAK_MINUTES),10)

screenshots: install ## Refresh the pictures of the web pages in docs/screenshots/
	POSTIER_SCREENSHOTS=1 $(BIN)/python -m pytest -q tests/e2e/test_web.py tests/e2e/test_web_settings.py

clean: ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
