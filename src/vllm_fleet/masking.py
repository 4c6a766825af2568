"""Secrets never reach logs or terminals: mask them in env listings and command lines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# The secret word ends a part of the name: HF_TOKEN, OPENAI_API_KEY, APIKEY, API_KEYS,
# DB_PASSWORD; but not TOKENIZERS_PARALLELISM or AUTHOR.
_SECRET_NAME = re.compile(
    r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)S?(_|$)", re.IGNORECASE
)
_SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--ssl-keyfile-password"})
MASK = "****"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask_value(value: str) -> str:
    """Show only whether a value is set, never any part of it."""
    return MASK if value else ""


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: mask_value(v) if is_secret_name(k) else v for k, v in env.items()}


_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mask_argv(argv: Sequence[str]) -> list[str]:
    """Mask the values of secret flags (`--api-key X`, `--api-key=X`, and `--api_key`, which
    vLLM reads the same) and `NAME=value` words with a secret NAME (`env HF_TOKEN=x ...`)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, value = arg.partition("=")
        name = flag.replace("_", "-") if flag.startswith("--") else flag
        if name in _SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        if eq and _ENV_ASSIGNMENT.match(flag) and is_secret_name(flag):
            out.append(f"{flag}={mask_value(value)}")
            continue
        out.append(arg)
    return out


# A secret's value in a line of text (an engine's log): `api_key='sk-..'`, `"api_key":
# ["sk-.."]`, `HF_TOKEN=hf_..`, `--api-key sk-..`, `--hf-token=hf_..`.
_SECRET_IN_TEXT = re.compile(
    r"""(?ix)
    ( (?:--)?[a-z_-]*(?:api[_-]?keys?|token|secrets?|password|passwd|credentials?)
      ['"]? \s* [:=] \s* \[? \s* ['"]? )
    ( [^'"\s,\]}]+ )
    | ( --(?:api[_-]key|hf[_-]token|ssl[_-]keyfile[_-]password) \s+ )
    ( [^\s'",\]}]+ )
    """
)


def mask_text(line: str) -> str:
    """`line` with every value that follows a secret's name masked (engine log tails
    shown on the status page: vLLM logs its non-default arguments, the key among them)."""

    def hide(match: re.Match[str]) -> str:
        head = match.group(1) if match.group(1) is not None else match.group(3)
        return f"{head}{MASK}"

    return _SECRET_IN_TEXT.sub(hide, line)
