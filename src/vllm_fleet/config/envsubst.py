"""`${VAR}` expansion for fleet files: pure, and every failure names the place.

Supported forms, as in shell and docker compose:
  ${NAME}            the variable's value; an error when it is unset
  ${NAME:-default}   the value, or `default` when unset or empty
  ${NAME-default}    the value, or `default` when unset
  $$                 a literal `$` (also inside a default)
A default cannot hold another `${...}`: that is an error, never a literal left behind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)((?:[^}$]|\$\$)*))?\}|\$\{[^}]*\}?")


@dataclass(frozen=True)
class ExpansionError:
    path: tuple[str | int, ...]
    message: str


def expand_string(
    text: str, environ: Mapping[str, str], path: tuple[str | int, ...]
) -> tuple[str, list[ExpansionError]]:
    """Expand one string; returns the result and the problems found (empty when fine)."""
    errors: list[ExpansionError] = []

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2), match.group(3)
        if name is None:
            errors.append(
                ExpansionError(
                    path,
                    f"`{whole}` is not a valid variable reference; "
                    "write ${NAME} or ${NAME:-default} (and $$ for a literal $; "
                    "a default cannot hold another ${...})",
                )
            )
            return whole
        value = environ.get(name)
        default = (default or "").replace("$$", "$")
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        if value is None:
            errors.append(
                ExpansionError(
                    path,
                    f"environment variable {name} is not set; export it before starting "
                    f"the fleet, or give a default with ${{{name}:-default}}",
                )
            )
            return ""
        return value

    return _TOKEN.sub(replace, text), errors


def expand_tree(
    data: Any, environ: Mapping[str, str], path: tuple[str | int, ...] = ()
) -> tuple[Any, list[ExpansionError]]:
    """Expand every string scalar in a parsed YAML tree (keys are left as written)."""
    if isinstance(data, str):
        return expand_string(data, environ, path)
    errors: list[ExpansionError] = []
    if isinstance(data, dict):
        out: dict[Any, Any] = {}
        for key, value in data.items():
            out[key], errs = expand_tree(value, environ, (*path, str(key)))
            errors.extend(errs)
        return out, errors
    if isinstance(data, list):
        items: list[Any] = []
        for index, value in enumerate(data):
            item, errs = expand_tree(value, environ, (*path, index))
            items.append(item)
            errors.extend(errs)
        return items, errors
    return data, errors
