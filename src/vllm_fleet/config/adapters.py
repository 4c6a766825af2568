"""Fleet-file rules for LoRA adapters (deployments with `adapter:` and `base:`).

- The id follows the deployment id rule; it is also the name the engine serves the
  adapter as (vLLM's `lora_name`), so it and its aliases may not be any other
  deployment's id, model code, served name or alias.
- `base` names a deployment in the file that the fleet runs itself (not `endpoints:`:
  the fleet loads adapters into engines it owns), and not another adapter.
- A local adapter is a directory holding PEFT's `adapter_config.json`; its rank (`r`) is
  read from there (`read_adapter`, the one part here that reads files), for the base's
  `--max-lora-rank`. Anything else must look like a Hugging Face id (`org/name`).

`check_adapters(config)` returns every problem found; `checks.check` adds them.
"""

from __future__ import annotations

import json

from vllm_fleet.config.flags import flag_value
from vllm_fleet.config.models import HF_ID_PATTERN, Adapter, FleetConfig
from vllm_fleet.config.problems import ConfigIssue, Loc

# vLLM 0.32's accepted `--max-lora-rank` values (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CONFIG_FILE = "adapter_config.json"


def check_adapters(config: FleetConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    add = issues.append
    owners = _names_of_deployments(config)
    engines = ", ".join(config.deployments) or "none"
    for a_id, adapter in config.adapters.items():
        at: Loc = ("deployments", a_id)
        base = config.deployments.get(adapter.base)
        if base is None:
            what = "an adapter itself" if adapter.base in config.adapters else "not in this file"
            add(
                ConfigIssue(
                    (*at, "base"),
                    f"`{adapter.base}` is {what}; `base` names the deployment (with "
                    f"`model:`) whose engines serve this adapter; deployments: {engines}",
                )
            )
        elif base.remote:
            add(
                ConfigIssue(
                    (*at, "base"),
                    f"`{adapter.base}` runs elsewhere (`endpoints:`); the fleet loads adapters "
                    "into engines it starts itself: serve the adapter on that server with "
                    "`--lora-modules`, or pick a base the fleet runs",
                )
            )
        for where, name, kind in [
            ((), a_id, "id"),
            *((("aliases", i), alias, "alias") for i, alias in enumerate(adapter.aliases)),
        ]:
            other = owners.get(name)
            if other is not None and other != a_id:
                add(
                    ConfigIssue(
                        (*at, *where),
                        f"{kind} `{name}` is already a name of deployment `{other}` (its id, "
                        "model code, served name or an alias); clients could not tell them "
                        f"apart, pick another {kind}",
                    )
                )
            else:
                owners[name] = a_id
        problem = read_adapter(config, adapter)
        if problem is not None:
            add(ConfigIssue((*at, "adapter"), problem))
        rank = adapter.lora_rank
        limit = flag_value(base.args, "--max-lora-rank") if base is not None else None
        if rank is not None and limit is not None and limit.isdigit() and rank > int(limit):
            add(
                ConfigIssue(
                    (*at, "adapter"),
                    f"its LoRA rank {rank} is over the --max-lora-rank {limit} that "
                    f"`{adapter.base}` sets in its args (vLLM would refuse to load it); raise "
                    "it there, or remove it to have the fleet fit it to the adapters",
                )
            )
        if rank is not None and rank > VLLM_RANKS[-1]:
            add(
                ConfigIssue(
                    (*at, "rank"),
                    f"rank {rank} is over vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]}); "
                    "vLLM cannot serve this adapter",
                )
            )
    return issues


def _names_of_deployments(config: FleetConfig) -> dict[str, str]:
    """Every name a client may send for a deployment with engines -> its id."""
    owners: dict[str, str] = {}
    for dep_id, dep in config.deployments.items():
        for name in (dep_id, dep.model, dep.served_as, *dep.aliases):
            owners.setdefault(name, dep_id)
    return owners


def read_adapter(config: FleetConfig, adapter: Adapter) -> str | None:
    """Look at a local adapter: None when it is a PEFT adapter directory (its rank is
    kept on the model) or a Hugging Face id; else what is wrong, with what to do."""
    path = config.path_of(adapter.adapter)
    if not path.exists():
        if HF_ID_PATTERN.fullmatch(adapter.adapter) and not _looks_local(adapter.adapter):
            adapter._source = adapter.adapter  # a Hugging Face id: the engine fetches it
            return None
        return (
            f"no directory {path}; give a PEFT adapter directory (holding {CONFIG_FILE}; "
            "a relative path is relative to the fleet file) or a Hugging Face id (org/name)"
        )
    if not path.is_dir():
        return f"{path} is a file; give the adapter's directory (holding {CONFIG_FILE})"
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (
            f"{path} holds no {CONFIG_FILE}: not a PEFT adapter directory (PEFT's "
            "`save_pretrained` writes it beside the weights)"
        )
    except (OSError, ValueError) as exc:
        return f"cannot read {path / CONFIG_FILE}: {exc}"
    adapter._source = str(path.resolve())
    rank = data.get("r") if isinstance(data, dict) else None
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
        adapter._read_rank = rank
    return None


def _looks_local(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~"))
