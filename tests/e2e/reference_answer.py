"""transformers' own greedy answer to a chat, for comparing with vLLM's on this machine.

Run with the engines' python (it has torch and transformers; the project's does not):

    .venv-vllm/bin/python tests/e2e/reference_answer.py MODEL_DIR MAX_TOKENS DTYPE \
        [ADAPTER_DIR] < messages.json

Prints one JSON object: {"text": ..., "completion_tokens": ..., "prompt_tokens": ...}.
The prompt is the model's chat template with the generation prompt added, as vLLM's
/v1/chat/completions renders it; decoding is greedy and stops at the model's end token.
With ADAPTER_DIR, the model runs with that PEFT LoRA adapter (peft's own implementation).
"""

from __future__ import annotations

import json
import sys

import torch  # type: ignore[import-not-found,unused-ignore]
from transformers import (  # type: ignore[import-not-found,unused-ignore]
    AutoModelForCausalLM,
    AutoTokenizer,
)


def main() -> None:
    model_dir, max_tokens, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    adapter_dir = sys.argv[4] if len(sys.argv) > 4 else None
    messages = json.load(sys.stdin)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    if adapter_dir is not None:
        from peft import PeftModel  # type: ignore[import-not-found,unused-ignore]

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=max_tokens, do_sample=False)
    new = out[0][prompt["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    prompt_tokens = int(prompt["input_ids"].shape[1])
    print(json.dumps({"text": text, "completion_tokens": len(new), "prompt_tokens": prompt_tokens}))


if __name__ == "__main__":
    main()
