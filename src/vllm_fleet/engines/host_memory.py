"""How much host memory a level-1 sleep needs (the model's weights, from their files)
and how much the host has free (`MemAvailable`). Either is None when unknown."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def available() -> int | None:
    """Bytes of memory the kernel says can be used without swapping."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _files_size(folder: Path) -> int | None:
    total = 0
    found = False
    for path in folder.rglob("*"):
        if path.name.endswith(WEIGHT_SUFFIXES):
            try:
                total += path.stat().st_size  # through links: the HF cache's blobs
            except OSError:
                continue
            found = True
    return total if found else None


def weights_size(model: str, cwd: Path) -> int | None:
    """The size of `model`'s weight files: a local folder, else the Hugging Face cache's
    copy of a model code; None when neither is found."""
    local = cwd / os.path.expanduser(model)
    try:
        if local.is_dir():
            return _files_size(local)
    except OSError:
        return None
    hub = os.environ.get("HF_HUB_CACHE")
    if hub is None:
        default = os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        home = os.environ.get("HF_HOME", default)
        hub = os.path.join(home, "hub")
    cached = Path(hub) / ("models--" + model.replace("/", "--")) / "snapshots"
    try:
        found = list(cached.iterdir()) if cached.is_dir() else []
        snapshots = sorted(found, key=lambda p: p.stat().st_mtime)
    except OSError:
        return None
    return _files_size(snapshots[-1]) if snapshots else None
