"""vllm-fleet: several vLLM engines on your GPUs behind one OpenAI- and Azure-compatible endpoint."""

__version__ = "0.1.0"
