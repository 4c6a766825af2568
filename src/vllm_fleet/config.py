"""The fleet file: pydantic models of fleet.yaml, and `load(path)`.

Every problem is reported at load with the place it sits (`deployments.qwen.gpus[1]`, and
the line of the file) and what to do about it. Nothing is clamped silently.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from vllm_fleet.config_checks import check
from vllm_fleet.config_issues import ConfigError, ConfigIssue, Loc, format_loc
from vllm_fleet.envsubst import expand_tree
from vllm_fleet.yaml_source import (
    Lines,
    as_written,
    duplicate_keys,
    line_index,
    nearest_line,
    number_texts,
)

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "Deployment",
    "EnginesConfig",
    "FleetConfig",
    "GatewayConfig",
    "Loc",
    "format_loc",
    "load",
    "loads",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _scalar_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _stringify_scalars(value: Any) -> Any:
    """YAML gives `2048` and `0.5` as numbers; engine args and env values are strings."""
    if isinstance(value, list):
        return [
            str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value
        ]
    if isinstance(value, dict):
        return {k: _scalar_str(v) for k, v in value.items()}
    return value


def _no_bool(value: Any) -> Any:
    """YAML reads `true`/`yes`/`on` as booleans, which pydantic would take as the number 1."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, bool) for item in items):
        raise ValueError("a yes/no value where a number is expected")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]

# A host name or an IP address (IPv6 without brackets): nothing that could break out of a
# URL or an nginx directive (`fleet nginx` renders hosts and endpoints into its vhost).
HOST_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")
# http(s)://host[:port][/path], host a name, an IPv4 or a bracketed IPv6 address.
ENDPOINT_PATTERN = re.compile(
    r"^https?://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/[A-Za-z0-9._~%/-]*)?$"
)


def _check_host(value: str) -> str:
    if not HOST_PATTERN.fullmatch(value):
        raise ValueError(
            f"`{value}` is not a host name or IP address (letters, digits, `.`, `-`, `:`); "
            "e.g. 127.0.0.1"
        )
    return value


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_mb: Annotated[float, Field(gt=0)] = 32.0
    # Keys clients must present (Bearer or `api-key`); empty means no auth at the gateway.
    api_keys: list[str] = Field(default_factory=list)
    # Start engines so they accept any `model` (for a front end that cannot rewrite bodies).
    accept_any_model: bool = False
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    # The HTTP server: `aiohttp` (the framework), or `fast` (the protocol-level relay).
    server: Literal["aiohttp", "fast"] = "fast"
    # Client connections served at once (`fast` server); beyond, a 503. None: what the
    # open-files limit allows (two sockets per stream).
    max_connections: Annotated[int, Field(ge=1)] | None = None

    _host = field_validator("host")(lambda v: _check_host(v))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class EnginesConfig(_Strict):
    """Defaults for every engine the fleet starts."""

    log_dir: str = ".fleet/logs"
    base_port: Port = 8100
    start_timeout: Annotated[float, Field(gt=0)] = 1800.0
    stop_timeout: Annotated[float, Field(ge=0)] = 30.0
    health_interval: Annotated[float, Field(gt=0)] = 2.0
    max_restarts: Annotated[int, Field(ge=0)] = 5
    backoff_initial: Annotated[float, Field(ge=0)] = 1.0
    backoff_max: Annotated[float, Field(ge=0)] = 60.0
    # An engine that stayed ready this long has its failure count reset.
    stable_after: Annotated[float, Field(ge=0)] = 60.0
    # An engine's log over this size is copied to <log>.1 and emptied; log_keep copies.
    log_max_mb: Annotated[float, Field(gt=0)] = 100.0
    log_keep: Annotated[int, Field(ge=0)] = 3
    # A ready vLLM engine with requests running or waiting whose token counters (its
    # /metrics) do not move for this long is stalled: out of the rotation, restarted.
    # 0 turns it off. Generous: a long prompt's prefill counts no token until it ends.
    stall_timeout: Annotated[float, Field(ge=0)] = 120.0
    # vLLM's internal ports (torch.distributed stores, data-parallel ports) are found by
    # scanning up from VLLM_PORT; each engine gets a block of its own, so engines started
    # together never race for one port. Engine i (in file order) gets VLLM_PORT =
    # vllm_port_base + i * vllm_port_span. Default 20000-: above the serving ports
    # (base_port 8100, gateway 8080) and below Linux's ephemeral ports (32768-60999).
    vllm_port_base: Port = 20000
    vllm_port_span: Annotated[int, Field(ge=1, le=10000)] = 100

    @property
    def log_max_bytes(self) -> int:
        return int(self.log_max_mb * 2**20)


class Deployment(_Strict):
    model: Annotated[str, Field(min_length=1)]
    gpus: list[Annotated[int, Field(ge=0)]] | Annotated[int, Field(ge=1)] | None = None
    share_gpus: bool = False
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: Port | None = None
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # The name responses carry (vLLM's first --served-model-name); default: `model`.
    # Useful when `model` is a local path.
    served_name: Annotated[str, Field(min_length=1)] | None = None
    command: list[str] | None = None
    endpoints: list[str] = Field(default_factory=list)
    start_timeout: Annotated[float, Field(gt=0)] | None = None
    # Per deployment `engines.stall_timeout`; set here, it also watches a command the
    # fleet does not recognise as vLLM (a wrapper script). 0 turns it off.
    stall_timeout: Annotated[float, Field(ge=0)] | None = None

    _coerce_args = field_validator("args", "env", "command", mode="before")(
        lambda v: _stringify_scalars(v)
    )
    _numbers = field_validator("gpus", "port", "replicas", mode="before")(lambda v: _no_bool(v))
    _host = field_validator("host")(lambda v: _check_host(v))

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not ENDPOINT_PATTERN.fullmatch(url):
                raise ValueError(
                    f"`{url}` is not an http(s) URL (host, optional port and path; no query, "
                    "spaces or quotes); write it like http://10.1.2.3:8000"
                )
        return [url.rstrip("/") for url in value]

    @property
    def remote(self) -> bool:
        return bool(self.endpoints)

    @property
    def served_as(self) -> str:
        """The name the engine answers with, and the gateway rewrites `model` to."""
        return self.served_name or self.model

    def per_replica_gpus(self) -> int | None:
        if self.gpus is None:
            return None
        count = self.gpus if isinstance(self.gpus, int) else len(self.gpus)
        return count // self.replicas if isinstance(self.gpus, list) else count


class FleetConfig(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    engine_command: list[str] = Field(default_factory=lambda: ["vllm", "serve", "{model}"])
    deployments: dict[str, Deployment]
    # Directory the fleet file lives in; relative paths (log_dir) resolve from here.
    base_dir: str = "."
    source: str = "<memory>"

    _coerce_command = field_validator("engine_command", mode="before")(
        lambda v: _stringify_scalars(v)
    )
    # Where each place sits in the file, so later checks (the plan) can name the line too.
    _lines: dict[Loc, int] = PrivateAttr(default_factory=dict)

    def line_of(self, loc: Loc) -> int | None:
        """The line of `loc` in the fleet file (or of its nearest enclosing place)."""
        return nearest_line(Lines(self._lines), loc)

    def log_dir(self) -> Path:
        path = Path(self.engines.log_dir).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


# ---------------------------------------------------------------- loading


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
    expanded["base_dir"] = base_dir
    expanded["source"] = source
    try:
        config = FleetConfig.model_validate(expanded)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, skip={e.path for e in exp_errors}))
    else:
        issues.extend(check(config))
        if not issues:
            config._lines = lines.by_loc
            return config
    for issue in issues:
        issue.line = issue.line or nearest_line(lines, issue.loc)
    raise ConfigError(source, issues)


# pydantic names the branch of the `gpus: list | int` union right after `gpus` in a loc.
_LIST_BRANCH = "list[constrained-int]"
_INT_BRANCH = "constrained-int"


def _union_branch(loc: Loc) -> tuple[Loc, str | None]:
    """The loc without the union branch tag, and the branch (None outside the union)."""
    for index in range(1, len(loc)):
        if loc[index - 1] == "gpus" and loc[index] in (_LIST_BRANCH, _INT_BRANCH):
            return (*loc[:index], *loc[index + 1 :]), str(loc[index])
    return loc, None


def _pydantic_issues(exc: ValidationError, skip: set[Loc]) -> list[ConfigIssue]:
    """One issue per place; `skip` holds places already reported (an unset ${VAR})."""
    issues: list[ConfigIssue] = []
    seen: set[Loc] = set(skip)
    for err in exc.errors():
        # A union (gpus: list | int) reports one error per branch; keep the branch the
        # value was meant for: the list one when a list was given, else the count one.
        loc, branch = _union_branch(tuple(err["loc"]))
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
            message = f"{err['msg']} (got {_input(err)})"
        issues.append(ConfigIssue(loc=loc, message=message))
    return issues


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
