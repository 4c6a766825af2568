"""`fleet keys new`: a fresh client key, and the `gateway.keys` line that holds its digest.

The key itself is printed once and never stored; the fleet file keeps its SHA-256.
"""

from __future__ import annotations

import secrets
from typing import Any

import yaml

from vllm_fleet.config.models import KEY_NAME_PATTERN, KEY_NAME_RULE, key_digest

PREFIX = "sk-fleet-"


class KeyNameError(ValueError):
    """The name is no valid key name; the message says what is."""


def new_key() -> str:
    """A random key: `sk-fleet-` and 32 random bytes, URL-safe base64."""
    return PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not KEY_NAME_PATTERN.fullmatch(name):
        raise KeyNameError(f"`{name}` is not a key name: {KEY_NAME_RULE}")
    return name


def key_line(
    name: str,
    key: str,
    deployments: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    admin: bool = False,
) -> str:
    """One YAML flow mapping for a `gateway.keys:` list, e.g.
    `- {name: team-a, key_sha256: 3f2a..., deployments: [qwen]}` (None: every deployment,
    written `'*'`). Values YAML would misread (`null`, `123`) come out quoted."""
    entry: dict[str, Any] = {
        "name": check_name(name),
        "key_sha256": key_digest(key),
        "deployments": list(deployments) if deployments is not None else "*",
    }
    for field, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
        if value is not None:
            entry[field] = value
    if admin:
        entry["admin"] = True
    text = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=2**20)
    return f"- {text.strip()}"
