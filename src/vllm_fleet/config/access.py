"""Fleet-file rules for client keys (`gateway.keys`, `gateway.api_keys`): unique names and
keys, deployments that exist, per-deployment limits only where the key may go.

Pure: `check_keys(config)` returns every problem found; `checks.check` adds them.
"""

from __future__ import annotations

from vllm_fleet.config.models import FleetConfig, key_digest
from vllm_fleet.config.problems import ConfigIssue, Loc


def check_keys(config: FleetConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    add = issues.append
    gateway = config.gateway
    known = config.deployment_ids()
    ids = ", ".join(known) or "none"
    digests: dict[str, str] = {}
    for index, plain in enumerate(gateway.api_keys):
        at: Loc = ("gateway", "api_keys", index)
        if not plain:
            add(ConfigIssue(at, "an empty key; remove it, or give a key (best as ${VAR})"))
            continue
        owner = digests.setdefault(key_digest(plain), f"gateway.api_keys[{index}]")
        if owner != f"gateway.api_keys[{index}]":
            add(ConfigIssue(at, f"the same key as {owner}; each key is listed once"))
    names: dict[str, int] = {}
    for index, key in enumerate(gateway.keys):
        at = ("gateway", "keys", index)
        first = names.setdefault(key.name, index)
        if first != index:
            add(
                ConfigIssue(
                    (*at, "name"),
                    f"`{key.name}` is already the name of gateway.keys[{first}]; "
                    "give each key its own name (usage is counted by name)",
                )
            )
        where = f"gateway.keys[{index}] ({key.name})"
        owner = digests.setdefault(key.digest, where)
        if owner != where:
            field = "key" if key.key is not None else "key_sha256"
            add(
                ConfigIssue(
                    (*at, field),
                    f"the same key as {owner}; make a new one with `fleet keys new {key.name}`",
                )
            )
        if key.deployments != "*":
            if not key.deployments:
                add(
                    ConfigIssue(
                        (*at, "deployments"),
                        'no deployment listed; list the ones this key may use, or "*" for all',
                    )
                )
            for position, dep_id in enumerate(key.deployments):
                if dep_id not in known:
                    add(
                        ConfigIssue(
                            (*at, "deployments", position),
                            f"no deployment `{dep_id}` in this file; deployments: {ids}",
                        )
                    )
        for dep_id in key.limits:
            if dep_id not in known:
                add(
                    ConfigIssue(
                        (*at, "limits", dep_id),
                        f"no deployment `{dep_id}` in this file; deployments: {ids}",
                    )
                )
            elif not key.allows(dep_id):
                add(
                    ConfigIssue(
                        (*at, "limits", dep_id),
                        f"key `{key.name}` may not use `{dep_id}`; add it to `deployments` "
                        "or remove these limits",
                    )
                )
    return issues
