#!/usr/bin/env bash
# `make demo`: run examples/cpu-demo.yaml with `fleet up`, and print two requests to try.
#
# `make demo` sets these (run it rather than this script, unless you know them):
#   FLEET               the `fleet` command            (default .venv/bin/fleet)
#   FLEET_ENGINE_PYTHON the engines' python with vLLM  (default .venv-vllm/bin/python)
#   FLEET_MODELS        the prepared model folders     (default .cache/models)
#   DEMO_PORT           the gateway's port             (default 8080)
set -euo pipefail
cd "$(dirname "$0")/.."

FLEET="${FLEET:-.venv/bin/fleet}"
PORT="${DEMO_PORT:-8080}"
BASE="http://127.0.0.1:${PORT}"
export FLEET_ENGINE_PYTHON="${FLEET_ENGINE_PYTHON:-$PWD/.venv-vllm/bin/python}"
export FLEET_MODELS="${FLEET_MODELS:-$PWD/.cache/models}"
if [ "$(nproc 2>/dev/null || echo 1)" -lt 2 ]; then
  # The demo file binds chat to CPU 0 and embed to CPU 1; one core: let vLLM choose.
  export FLEET_CHAT_CPUS="${FLEET_CHAT_CPUS:-auto}" FLEET_EMBED_CPUS="${FLEET_EMBED_CPUS:-auto}"
fi

requests() {
  cat <<EOF
  # a chat completion (SmolLM2-135M-Instruct); any "model" works on the path route
  curl -s ${BASE}/chat/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "anything", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 60, "temperature": 0}'

  # an embedding (all-MiniLM-L6-v2, 384 dimensions)
  curl -s ${BASE}/embed/v1/embeddings -H 'Content-Type: application/json' \\
    -d '{"input": "vLLM behind one endpoint"}'
EOF
}

cat <<EOF
=== vllm-fleet CPU demo: two real models, each in its own vLLM engine, behind ${BASE}
    chat  -> $FLEET_MODELS/smollm2-135m-instruct
    embed -> $FLEET_MODELS/all-minilm-l6-v2
    Loading takes about a minute on 2 cores. Once ready, try:

$(requests)

    Also: ${BASE}/v1/models, ${BASE}/fleet/status; Ctrl-C stops everything.
EOF

# Print the requests again when every engine is ready (fleet up's own progress shows the
# loading). The watcher ends with `fleet up`: this shell's pid becomes fleet up's (exec).
FLEET_PID=$$
(
  while kill -0 "$FLEET_PID" 2>/dev/null; do
    if "${FLEET_ENGINE_PYTHON}" - "$BASE" 2>/dev/null <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/fleet/status", timeout=2) as r:
    status = json.load(r)
ups = [u for d in status["deployments"].values() for u in d["upstreams"]]
sys.exit(0 if ups and all(u["state"] == "ready" for u in ups) else 1)
PY
    then
      printf '\n=== ready: paste one of these into another terminal\n\n%s\n\n' "$(requests)"
      exit 0
    fi
    sleep 2
  done
) &

exec "$FLEET" up examples/cpu-demo.yaml --port "$PORT"
