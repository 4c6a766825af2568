"""Pure: what LoRA adapters (deployments with `adapter:` and `base:`) mean for engines.

A base deployment's engines get vLLM's multi-LoRA flags and run-time loading:

- `--enable-lora`, `--max-loras N` (adapters in one batch: one per adapter, at most
  MAX_LORAS; more take turns) and `--max-lora-rank R` (the smallest rank vLLM accepts that
  holds every adapter's rank; DEFAULT_RANK for one the fleet cannot read), each only when
  the base's own `args` do not set it;
- `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`: the fleet loads every adapter through
  `/v1/load_lora_adapter` once the engine is healthy and before it counts as ready, so a
  restart gets its adapters back and a reload adds or removes one with no restart.

The flags are stable across reloads: given the running engine's argv (`prior`), its
values are kept while they still hold every adapter (more adapters than `--max-loras`
only take turns), so adding or removing an adapter never restarts its base. Only an
adapter whose rank is over the running `--max-lora-rank`, or a first adapter on a base
started without LoRA, needs a new engine (the reload says which).

A base that sets `--enable-lora` in its `args` is a LoRA base with no adapters yet: it
gets run-time loading, so its first adapter needs no restart either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_fleet.config import Deployment, FleetConfig
from vllm_fleet.config.adapters import VLLM_RANKS
from vllm_fleet.config.flags import flag_name, flag_value

DEFAULT_RANK = 16  # vLLM's default --max-lora-rank, assumed for an adapter of unknown rank
MAX_LORAS = 4  # the most --max-loras the fleet sets by itself (GPU memory per slot)
RUNTIME_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
FLAGS = ("--enable-lora", "--max-loras", "--max-lora-rank")


@dataclass(frozen=True)
class LoraFlags:
    """What the fleet adds to one engine's command line and environment for LoRA."""

    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


NO_LORA = LoraFlags()


def fit_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


def needed_rank(config: FleetConfig, base: str) -> int | None:
    """The `--max-lora-rank` every adapter on `base` fits in; None when it has none."""
    ranks = [a.lora_rank or DEFAULT_RANK for a in config.adapters_on(base).values()]
    return fit_rank(max(ranks)) if ranks else None


def serves_lora(config: FleetConfig, dep_id: str, dep: Deployment) -> bool:
    """Whether the deployment's engines serve LoRA adapters: some adapter names it as its
    `base`, or its own args enable LoRA."""
    if dep.remote:
        return False
    return bool(config.adapters_on(dep_id)) or any(
        flag_name(a) == "--enable-lora" for a in dep.args
    )


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def lora_flags(
    config: FleetConfig, dep_id: str, dep: Deployment, prior: Sequence[str] | None = None
) -> LoraFlags:
    """The flags and environment for one engine of `dep_id` (see the module docstring);
    `prior`: the argv of the engine that runs now for the same replica, if any."""
    was_lora = prior is not None and "--enable-lora" in prior
    if not serves_lora(config, dep_id, dep) and not was_lora:
        return LoraFlags()
    own = {flag_name(a) for a in dep.args}
    count = min(max(len(config.adapters_on(dep_id)), 1), MAX_LORAS)
    need = needed_rank(config, dep_id)
    rank = need or DEFAULT_RANK
    if was_lora and prior is not None:
        old_rank = _int(flag_value(list(prior), "--max-lora-rank"))
        old_count = _int(flag_value(list(prior), "--max-loras"))
        if old_rank is not None and old_count is not None and old_rank >= (need or 1):
            count, rank = old_count, old_rank  # still holds every adapter: no restart
    args: list[str] = []
    if "--enable-lora" not in own:
        args.append("--enable-lora")
    if "--max-loras" not in own:
        args += ["--max-loras", str(count)]
    if "--max-lora-rank" not in own:
        args += ["--max-lora-rank", str(rank)]
    env = () if RUNTIME_ENV in dep.env else ((RUNTIME_ENV, "1"),)
    return LoraFlags(tuple(args), env)


def why_new_engine(config: FleetConfig, dep_id: str, old: Sequence[str], new: Sequence[str]) -> str:
    """Why the LoRA flags of a running engine of `dep_id` change, in words ("" when they
    do not): the reason a reload gives for replacing it."""

    def flags(argv: Sequence[str]) -> list[tuple[str, str | None]]:
        return [(f, flag_value(list(argv), f)) for f in FLAGS if f in map(flag_name, argv)]

    if flags(old) == flags(new):
        return ""
    if "--enable-lora" not in old:
        return (
            "its first adapter needs LoRA, which vLLM only turns on at start (start a base "
            "with `--enable-lora` in its args to add adapters with no restart)"
        )
    old_rank = flag_value(list(old), "--max-lora-rank")
    new_rank = flag_value(list(new), "--max-lora-rank")
    if old_rank != new_rank:
        return f"its adapters need --max-lora-rank {new_rank}, over the running engine's {old_rank}"
    return "its LoRA flags changed"


def wanted_adapters(config: FleetConfig, base: str) -> dict[str, str]:
    """What the engines of `base` must have loaded: adapter name (its id) -> what vLLM
    loads (the adapter's absolute directory, or its Hugging Face id)."""
    return {a_id: config.adapter_path(a) for a_id, a in config.adapters_on(base).items()}


def check_lines(config: FleetConfig, engines: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """What `fleet check` says of the adapters: per base, each adapter (its rank and what
    is loaded) and the flags the base's engines get. `engines`: (deployment, argv) of the
    planned engines."""
    out: list[str] = []
    for base in dict.fromkeys(a.base for a in config.adapters.values()):
        argv = next((list(a) for d, a in engines if d == base), [])
        flags = [
            f"{a} {flag_value(argv, a)}" if a != "--enable-lora" else a
            for a in FLAGS
            if any(flag_name(x) == a for x in argv)
        ]
        out.append(
            f"LoRA adapters on `{base}` (loaded into each of its engines before it is ready, "
            f"and on a reload with no restart); its engines get {' '.join(flags)} and "
            f"{RUNTIME_ENV}=1:"
        )
        for a_id, adapter in config.adapters_on(base).items():
            rank = adapter.lora_rank
            said = f"rank {rank}" if rank else f"rank unknown, {DEFAULT_RANK} assumed"
            out.append(f"  {a_id}: {config.adapter_path(adapter)} ({said})")
    return out
