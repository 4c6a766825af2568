"""Secrets never reach logs or terminals: mask them in env listings and command lines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
_SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--ssl-keyfile-password"})
MASK = "****"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask_value(value: str) -> str:
    """Show only that a value is set, and how long it is for short checks by eye."""
    return MASK if value else ""


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: mask_value(v) if is_secret_name(k) else v for k, v in env.items()}


def mask_argv(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(arg)
    return out
