"""Write a PEFT LoRA adapter for the demo's SmolLM2, for the real-vLLM LoRA e2e test.

Run with the engines' python (it has torch, transformers and peft; the project's does not):

    .venv-vllm/bin/python tests/e2e/lora_adapter.py --model MODEL_DIR --out ADAPTER_DIR \
        [--rank R] [--seed S] [--scale X]

The adapter (q_proj and v_proj, `lora_alpha` = 2 * rank) is random but deterministic: the
same model, rank and seed give byte-identical files. Its `lora_B` is `randn * 0.3`: seen
here (vLLM 0.32 CPU, float32), seeds 0 and 1 make vLLM's greedy answer to "What is the
capital of France?" differ from the base's and from each other's from the first token on,
still as words, and equal to peft's own greedy answer. Weaker (std 0.05 to 0.2) keeps
the base's answer or its first sentence; 0.5 gives degenerate text (seed 0: only newlines).
Prints one JSON line: {"out": ..., "rank": ..., "seed": ...}.

It imports nothing of the project: it runs outside the project's environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET_MODULES = ["q_proj", "v_proj"]
B_SCALE = 0.3  # lora_B ~ randn * B_SCALE


def make_adapter(
    model_dir: Path, out_dir: Path, *, rank: int = 8, seed: int = 0, scale: float = B_SCALE
) -> Path:
    """Write a LoRA adapter for the model in `model_dir` into `out_dir` (created, or
    overwritten); returns `out_dir`."""
    import torch  # type: ignore[import-not-found,unused-ignore]
    from peft import LoraConfig, get_peft_model  # type: ignore[import-not-found,unused-ignore]
    from transformers import AutoModelForCausalLM  # type: ignore[import-not-found,unused-ignore]

    torch.manual_seed(seed)  # lora_A: nn.Linear's own init (init_lora_weights=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGET_MODULES,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True, help="the base model's folder")
    parser.add_argument("--out", type=Path, required=True, help="the adapter's folder")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--scale", type=float, default=B_SCALE, help=f"lora_B's std (default {B_SCALE})"
    )
    args = parser.parse_args(argv)
    out = make_adapter(args.model, args.out, rank=args.rank, seed=args.seed, scale=args.scale)
    print(json.dumps({"out": str(out), "rank": args.rank, "seed": args.seed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
