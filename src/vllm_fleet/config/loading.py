"""Reading a fleet file: YAML with its lines, `${VAR}` expansion, the models, the checks.

`load(path)` / `loads(text)` return a FleetConfig or raise ConfigError naming every
problem with its place (`deployments.qwen.gpus[1]`), its line and what to do about it.
Nothing is clamped silently.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vllm_fleet.config.checks import check
from vllm_fleet.config.envsubst import expand_tree
from vllm_fleet.config.models import (
    Adapter,
    Deployment,
    EnginesConfig,
    FleetConfig,
    GatewayConfig,
)
from vllm_fleet.config.problems import ConfigError, ConfigIssue, Loc
from vllm_fleet.config.yaml_source import (
    as_written,
    duplicate_keys,
    line_index,
    nearest_line,
    number_texts,
)


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> FleetConfig:
    """Read, expand and validate a fleet file; raise ConfigError naming every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            source, [ConfigIssue(loc=(), message="file not found; check the path")]
        ) from None
    except OSError as exc:
        raise ConfigError(source, [ConfigIssue(loc=(), message=f"cannot read: {exc}")]) from None
    base_dir = str(Path(path).resolve().parent)
    return loads(text, source=source, base_dir=base_dir, environ=environ)


def loads(
    text: str,
    *,
    source: str = "<string>",
    base_dir: str = ".",
    environ: Mapping[str, str] | None = None,
) -> FleetConfig:
    env = os.environ if environ is None else environ
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = None
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        message = str(getattr(exc, "problem", None) or exc)
        raise ConfigError(
            source,
            [ConfigIssue(loc=(), message=f"not valid YAML: {message}", line=line)],
        ) from None
    lines = line_index(node)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            source,
            [ConfigIssue(loc=(), message="the fleet file must be a mapping with `deployments:`")],
        )
    expanded, exp_errors = expand_tree(as_written(raw, number_texts(node)), env)
    issues = [ConfigIssue(loc=e.path, message=e.message) for e in exp_errors]
    issues.extend(duplicate_keys(node))
    for reserved in ("base_dir", "source"):
        if reserved in expanded:
            issues.append(ConfigIssue(loc=(reserved,), message="unknown key"))
    if "adapters" in expanded:
        issues.append(ConfigIssue(loc=("adapters",), message=ADAPTERS_KEY))
    adapter_ids = _move_adapters(expanded)
    expanded["base_dir"] = base_dir
    expanded["source"] = source
    try:
        config = FleetConfig.model_validate(expanded)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, {e.path for e in exp_errors}, adapter_ids))
    else:
        issues.extend(check(config))
        if not issues:
            config._lines = lines.by_loc
            return config
    for issue in issues:
        issue.line = issue.line or nearest_line(lines, issue.loc)
    raise ConfigError(source, issues)


ADAPTERS_KEY = (
    "unknown key `adapters`: a LoRA adapter is a deployment like the others, written under "
    "`deployments:` with `adapter:` (its directory or Hugging Face id) and `base:`"
)


def _move_adapters(expanded: dict[str, Any]) -> frozenset[str]:
    """Move the deployments that give `adapter:` to FleetConfig's `adapters` (the models
    keep apart what runs engines); their ids, so errors name them as written."""
    expanded.pop("adapters", None)
    deployments = expanded.get("deployments")
    if not isinstance(deployments, dict):
        return frozenset()
    adapters = {k: v for k, v in deployments.items() if isinstance(v, dict) and "adapter" in v}
    if adapters:
        expanded["deployments"] = {k: v for k, v in deployments.items() if k not in adapters}
        expanded["adapters"] = adapters
    return frozenset(str(k) for k in adapters)


# What an adapter deployment has no use for: said instead of "unknown key".
ADAPTER_FOREIGN = (
    "an adapter deployment runs on the engines of its `base` and has no engine of its own; "
    "`{key}` belongs on the base deployment (`base: ...`), or remove it"
)
NOT_AN_ADAPTER = (
    "`{key}` belongs to an adapter deployment, which gives `adapter:` (its directory or "
    "Hugging Face id) and `base:` and no `model`"
)


# Keys the fleet file no longer has -> what to do instead (reported in place of "unknown
# key", so a file written for an older version says what changed).
REMOVED_KEYS: dict[Loc, str] = {
    ("gateway", "server"): "`server` was removed: the gateway has one HTTP server now (the "
    "protocol-level relay, which was the default `fast`); delete this key",
    ("gateway", "drain_timeout"): "`drain_timeout` moved to `engines.drain_timeout` (it also "
    "bounds the drain of an engine a reload stops); move it there",
}

# pydantic names the branch of the `gpus: list | int` union right after `gpus` in a loc.
_LIST_BRANCH = "list[constrained-int]"
_INT_BRANCH = "constrained-int"


def _union_branch(loc: Loc) -> tuple[Loc, str | None]:
    """The loc without the union branch tag, and the branch (None outside the union)."""
    for index in range(1, len(loc)):
        if loc[index - 1] == "gpus" and loc[index] in (_LIST_BRANCH, _INT_BRANCH):
            return (*loc[:index], *loc[index + 1 :]), str(loc[index])
    return loc, None


def _pydantic_issues(
    exc: ValidationError, skip: set[Loc], adapter_ids: frozenset[str] = frozenset()
) -> list[ConfigIssue]:
    """One issue per place; `skip` holds places already reported (an unset ${VAR});
    `adapter_ids`: the deployments the loader moved to `adapters` (named as written)."""
    issues: list[ConfigIssue] = []
    seen: set[Loc] = set(skip)
    for err in exc.errors():
        # A union (gpus: list | int) reports one error per branch; keep the branch the
        # value was meant for: the list one when a list was given, else the count one.
        loc, branch = _union_branch(tuple(err["loc"]))
        if loc[:1] == ("adapters",):
            loc = ("deployments", *loc[1:])
        if branch == _LIST_BRANCH and err["type"] == "list_type":
            continue
        if branch == _INT_BRANCH and isinstance(err.get("input"), list):
            continue
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:  # a mapping key that is not text: name the place by the key itself
            loc = (*loc[:-2], str(err.get("input")))
        if loc in seen:
            continue
        seen.add(loc)
        kind = err["type"]
        if is_key:
            message = (
                f"this key is read by YAML as {_input(err)}, not as text; quote it "
                "(YAML reads yes/no/on/off/true/false and numbers as other types)"
            )
        elif kind == "extra_forbidden" and loc in REMOVED_KEYS:
            message = REMOVED_KEYS[loc]
        elif kind == "extra_forbidden" and _adapter_place(loc, adapter_ids):
            key = str(loc[-1])
            if key in Deployment.model_fields:
                message = ADAPTER_FOREIGN.format(key=key)
            else:
                known = list(Adapter.model_fields)
                hint = difflib.get_close_matches(key, known, n=1)
                message = f"unknown key `{key}`"
                message += f"; did you mean `{hint[0]}`?" if hint else ""
                message += f" Known keys of an adapter deployment: {', '.join(known)}."
        elif kind == "extra_forbidden" and len(loc) == 3 and loc[2] in ("base", "adapter", "rank"):
            message = NOT_AN_ADAPTER.format(key=loc[2])
        elif kind == "extra_forbidden":
            key = str(loc[-1])
            known = _known_keys(loc[:-1])
            hint = difflib.get_close_matches(key, known, n=1)
            message = f"unknown key `{key}`"
            message += f"; did you mean `{hint[0]}`?" if hint else ""
            message += f" Known keys here: {', '.join(known)}."
        elif kind == "missing":
            message = f"`{loc[-1]}` is required here"
            if loc == ("deployments",):
                message += "; add at least one deployment (see examples/)"
        elif (loc and loc[-1] == "gpus") or (len(loc) >= 2 and loc[-2] == "gpus"):
            message = (
                "`gpus` is a list of GPU indices (`[0, 1]`) or a count (`2`) that the fleet "
                f"fills from the machine's GPUs; got {_input(err)}"
            )
        elif kind == "string_type" and isinstance(err.get("input"), bool | None):
            message = (
                f"expected text, got {_input(err)}: YAML reads yes/no/true/false/on/off and an "
                'empty value as something else; quote it, e.g. "false" or ""'
            )
        else:
            message = err["msg"].removeprefix("Value error, ")
            if not _secret_place(loc):
                message += f" (got {_input(err)})"
        issues.append(ConfigIssue(loc=loc, message=message))
    return issues


# The parts of a client key that may be shown back in an error (the key itself never).
_KEY_FIELDS_SHOWN = frozenset({"name", "deployments", "expires", "admin", "rpm", "tpm"})


def _secret_place(loc: Loc) -> bool:
    """Whether the value at `loc` may hold a key (never quoted in an error)."""
    if loc[:2] == ("gateway", "api_keys"):
        return True
    if loc[:2] != ("gateway", "keys"):
        return False
    return not (len(loc) > 3 and loc[3] in _KEY_FIELDS_SHOWN)


def _adapter_place(loc: Loc, adapter_ids: frozenset[str]) -> bool:
    """Whether `loc` is a key right inside an adapter deployment."""
    return len(loc) == 3 and loc[0] == "deployments" and loc[1] in adapter_ids


def _input(err: Any) -> str:
    value = err.get("input")
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _known_keys(loc: Loc) -> list[str]:
    models: dict[Loc, type[BaseModel]] = {
        (): FleetConfig,
        ("gateway",): GatewayConfig,
        ("engines",): EnginesConfig,
    }
    model = models.get(loc)
    if model is None and len(loc) == 2 and loc[0] == "deployments":
        model = Deployment
    if model is None:
        return []
    hidden = {"base_dir", "source"}
    return [name for name in model.model_fields if name not in hidden]
