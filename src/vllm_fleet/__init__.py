"""vllm-fleet: several vLLM engines on your GPUs behind one OpenAI/Azure-compatible endpoint."""

__version__ = "0.1.0"
