# vllm-fleet: `make demo` runs the fleet on this machine, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv lint format test test-fast demo clean bench bench-quick

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/ruff format --check src tests bench scripts
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format src tests bench scripts
	$(VENV)/bin/ruff check --fix src tests bench scripts

test-fast: venv
	$(PY) -m pytest -q -m "not vllm"

test: lint
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) .fleet examples/.fleet .pytest_cache .mypy_cache .ruff_cache

# The gateway overhead benchmark: direct vs nginx vs `fleet up` (docs/performance.md).
bench: $(VENV)/.installed-bench
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { echo "--- installing nginx"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
	$(PY) -m bench

bench-quick: $(VENV)/.installed-bench
	$(PY) -m bench --quick --out $(VENV)/bench-quick

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@
