"""A fake vLLM engine that really holds GPU memory, for checking placement on a GPU machine.

    python scripts/cuda_fake_engine.py MODEL [fake_vllm / vllm flags ...]

It imports PyTorch, takes `--hold-mib` MiB (default 512) on the first GPU it can see,
writes what it sees (pid, CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER, the visible GPUs'
names and UUIDs) to `$FLEET_GPU_REPORT_DIR/<pid>.json`, then serves as
`vllm_fleet.testing.fake_vllm` with the same arguments. `scripts/gpu_check.py` starts a
fleet of these with `fleet up` and compares what each engine saw with `nvidia-smi`.
PyTorch belongs to the GPU machine, not to the project's environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    import torch  # the GPU machine's own PyTorch

    argv = sys.argv[1:]
    hold_mib = 512
    if "--hold-mib" in argv:
        at = argv.index("--hold-mib")
        hold_mib = int(argv[at + 1])
        del argv[at : at + 2]
    count = torch.cuda.device_count()
    seen = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        seen.append({"index": index, "name": props.name, "uuid": f"GPU-{props.uuid}"})
    held = None
    if count:
        held = torch.empty(hold_mib * 2**20, dtype=torch.uint8, device="cuda:0")
        held.fill_(1)
        torch.cuda.synchronize()
    report = {
        "pid": os.getpid(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER"),
        "visible": seen,
        "held_mib": hold_mib if held is not None else 0,
    }
    folder = Path(os.environ.get("FLEET_GPU_REPORT_DIR", "."))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{os.getpid()}.json").write_text(json.dumps(report, indent=2))

    from vllm_fleet.testing.fake_vllm import main as serve

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
