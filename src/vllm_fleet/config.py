"""The fleet file: pydantic models of fleet.yaml, and `load(path)`.

Every problem is reported at load with the place it sits (`deployments.qwen.gpus[1]`, and
the line of the file) and what to do about it. Nothing is clamped silently.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from vllm_fleet.envsubst import expand_tree

Loc = tuple[str | int, ...]

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ID_MAX_LEN = 63
# First path segments the gateway answers itself; a deployment id may not shadow them.
RESERVED_IDS = frozenset(
    {"v1", "v2", "openai", "health", "metrics", "fleet", "ping", "version", "docs", "api"}
)
# Engine flags the fleet sets itself; passing them in `args` would fight the launcher.
OWNED_FLAGS = {
    "--host": "set `host:` on the deployment instead (engines bind 127.0.0.1 by default)",
    "--port": "set `port:` on the deployment instead",
    "--served-model-name": "the fleet serves the model code, the id and `aliases:`; "
    "add extra names to `aliases:`",
}
PLACEHOLDERS = ("model", "host", "port", "python", "id")
# vLLM's default `--gpu-memory-utilization`: the fraction of the whole card one engine takes.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class ConfigIssue:
    """One problem in a fleet file: where it is and what to do."""

    loc: Loc
    message: str
    line: int | None = None

    def where(self) -> str:
        return format_loc(self.loc)


class ConfigError(Exception):
    """A fleet file that cannot be used; `issues` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} problem(s) in the fleet file"]
        for issue in self.issues:
            at = f"line {issue.line}, " if issue.line else ""
            place = issue.where() or "(top level)"
            lines.append(f"  {at}{place}: {issue.message}")
        return "\n".join(lines)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


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
    command: list[str] | None = None
    endpoints: list[str] = Field(default_factory=list)
    start_timeout: Annotated[float, Field(gt=0)] | None = None

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

    def served_names(self) -> list[str]:
        """Names the engine answers to: the model code first (what responses say)."""
        return _dedupe([self.model, *self.aliases])

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
        return _nearest_line(_Lines(self._lines), loc)

    def log_dir(self) -> Path:
        path = Path(self.engines.log_dir).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


Kind = Literal["id", "model", "alias"]


def _dedupe(items: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


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
    lines = _line_index(node)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            source,
            [ConfigIssue(loc=(), message="the fleet file must be a mapping with `deployments:`")],
        )
    expanded, exp_errors = expand_tree(_as_written(raw, _number_texts(node)), env)
    issues = [ConfigIssue(loc=e.path, message=e.message) for e in exp_errors]
    issues.extend(_duplicate_keys(node))
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
        issue.line = issue.line or _nearest_line(lines, issue.loc)
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


# ---------------------------------------------------------------- cross checks


def flag_name(arg: str) -> str:
    """The flag an argument sets, as vLLM reads it: `--a_b=1` is `--a-b` (vLLM's parser
    turns underscores in long flag names into dashes)."""
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def flag_value(args: list[str], *names: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in an argument list (last one wins)."""
    found = None
    for index, arg in enumerate(args):
        if flag_name(arg) not in names:
            continue
        if "=" in arg:
            found = arg.split("=", 1)[1]
        elif index + 1 < len(args):
            found = args[index + 1]
    return found


def engine_ports(dep: Deployment) -> list[int]:
    """Ports fixed in the file for a deployment's replicas (consecutive from `port`)."""
    if dep.port is None or dep.remote:
        return []
    return [dep.port + i for i in range(dep.replicas)]


def check(config: FleetConfig) -> list[ConfigIssue]:
    """Checks that span fields or deployments; pure, returns every problem found."""
    issues: list[ConfigIssue] = []
    add = issues.append
    if not config.deployments:
        add(ConfigIssue(loc=("deployments",), message="add at least one deployment"))
    issues.extend(_check_template(config.engine_command, ("engine_command",)))

    port_owner: dict[int, str] = {config.gateway.port: "the gateway (gateway.port)"}
    gpu_users: dict[int, list[str]] = {}  # GPU index -> deployments pinned to it, in order

    for dep_id, dep in config.deployments.items():
        at: Loc = ("deployments", dep_id)
        issues.extend(_check_id(dep_id, at))
        if dep.remote:
            for key in ("gpus", "share_gpus", "args", "env", "host", "port", "command"):
                if key in dep.model_fields_set:
                    add(
                        ConfigIssue(
                            loc=(*at, key),
                            message="a deployment with `endpoints` is already running "
                            "elsewhere and is never started by the fleet; remove "
                            f"`{key}` (or remove `endpoints` to have the fleet start it)",
                        )
                    )
            if "start_timeout" in dep.model_fields_set:
                add(
                    ConfigIssue(
                        loc=(*at, "start_timeout"),
                        message="a deployment with `endpoints` is never started by the fleet; "
                        "remove `start_timeout`",
                    )
                )
            if "replicas" in dep.model_fields_set:
                add(
                    ConfigIssue(
                        loc=(*at, "replicas"),
                        message="with `endpoints`, each URL is one replica; remove `replicas`",
                    )
                )
            continue
        if "endpoints" in dep.model_fields_set:
            add(
                ConfigIssue(
                    loc=(*at, "endpoints"),
                    message="`endpoints` is empty; list the URLs of engines already running, "
                    "or remove `endpoints` to have the fleet start this one",
                )
            )
        if dep.command is not None:
            issues.extend(_check_template(dep.command, (*at, "command")))
        for index, arg in enumerate(dep.args):
            flag = flag_name(arg)
            if flag in OWNED_FLAGS:
                add(
                    ConfigIssue(
                        loc=(*at, "args", index),
                        message=f"`{flag}` is set by the fleet; {OWNED_FLAGS[flag]}",
                    )
                )
        if "CUDA_VISIBLE_DEVICES" in dep.env and dep.gpus is not None:
            add(
                ConfigIssue(
                    loc=(*at, "env", "CUDA_VISIBLE_DEVICES"),
                    message="`gpus:` sets CUDA_VISIBLE_DEVICES; remove one of the two",
                )
            )
        # ports
        for replica, port in enumerate(engine_ports(dep)):
            if port > 65535:
                add(
                    ConfigIssue(
                        loc=(*at, "port"),
                        message=f"replica {replica} would get port {port}, past 65535; "
                        "lower `port`",
                    )
                )
                continue
            owner = port_owner.get(port)
            who = f"deployment `{dep_id}`" + (f" replica {replica}" if dep.replicas > 1 else "")
            if owner:
                add(
                    ConfigIssue(
                        loc=(*at, "port"),
                        message=f"port {port} is already taken by {owner}; pick another port "
                        "or leave `port` out to have one chosen",
                    )
                )
            else:
                port_owner[port] = who
        # gpus
        issues.extend(_check_utilization(dep, at))
        if isinstance(dep.gpus, list):
            if len(set(dep.gpus)) != len(dep.gpus):
                add(ConfigIssue(loc=(*at, "gpus"), message="a GPU index is listed twice"))
            if len(dep.gpus) == 0:
                add(
                    ConfigIssue(
                        loc=(*at, "gpus"),
                        message="an empty list pins the engine to no GPU; remove `gpus` "
                        "to leave CUDA_VISIBLE_DEVICES unset",
                    )
                )
            elif len(dep.gpus) % dep.replicas:
                add(
                    ConfigIssue(
                        loc=(*at, "gpus"),
                        message=f"{len(dep.gpus)} GPUs cannot be split evenly over "
                        f"{dep.replicas} replicas; list a multiple of {dep.replicas} GPUs "
                        "(each replica takes the next equal share) or give a count per "
                        "replica, e.g. `gpus: 1`",
                    )
                )
            for index, gpu in enumerate(dep.gpus):
                users = gpu_users.setdefault(gpu, [])
                if dep_id in users:
                    continue  # listed twice in this deployment: reported above
                # A GPU is shared only when every deployment on it says it shares.
                blocker = next(
                    (u for u in users if not (_shares(dep) and _shares(config.deployments[u]))),
                    None,
                )
                if blocker is not None:
                    add(
                        ConfigIssue(
                            loc=(*at, "gpus", index),
                            message=f"GPU {gpu} is already used by deployment `{blocker}`; "
                            "give each deployment its own GPUs, or let both share it: set "
                            "`share_gpus: true` and `--gpu-memory-utilization` (e.g. 0.45) "
                            "on both",
                        )
                    )
                    continue
                users.append(dep_id)
                issues.extend(_check_shared_memory(config, gpu, users, (*at, "gpus", index)))
        issues.extend(_check_parallelism(dep, at))
    issues.extend(_check_names(config))
    return issues


def _check_id(dep_id: str, at: Loc) -> list[ConfigIssue]:
    if not ID_PATTERN.fullmatch(dep_id):
        return [
            ConfigIssue(
                loc=at,
                message=f"deployment id `{dep_id}` is not URL-safe; use at most {ID_MAX_LEN} "
                "lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit "
                f"(for example `{_suggest_id(dep_id)}`)",
            )
        ]
    if dep_id in RESERVED_IDS:
        return [
            ConfigIssue(
                loc=at,
                message=f"deployment id `{dep_id}` is reserved by the gateway "
                f"({', '.join(sorted(RESERVED_IDS))}); pick another id",
            )
        ]
    return []


def _check_names(config: FleetConfig) -> list[ConfigIssue]:
    """Every name a client may send as `model` leads to one deployment: an alias may not
    be another deployment's id, model code or alias, nor a model code another's id."""
    issues: list[ConfigIssue] = []
    owners: dict[str, tuple[str, Kind]] = {dep_id: (dep_id, "id") for dep_id in config.deployments}
    # Two deployments may serve the same model code (the gateway then asks for an id).
    for dep_id, dep in config.deployments.items():
        owners.setdefault(dep.model, (dep_id, "model"))
    for dep_id, dep in config.deployments.items():
        other = owners.get(dep.model)
        if other and other[0] != dep_id and other[1] == "id":
            issues.append(
                ConfigIssue(
                    loc=("deployments", dep_id, "model"),
                    message=f"model code `{dep.model}` is also the id of deployment "
                    f"`{other[0]}`; rename that id",
                )
            )
        for index, alias in enumerate(dep.aliases):
            if alias in (dep_id, dep.model):
                continue
            other = owners.get(alias)
            if other and other[0] != dep_id:
                what = "model code" if other[1] == "model" else other[1]
                issues.append(
                    ConfigIssue(
                        loc=("deployments", dep_id, "aliases", index),
                        message=f"alias `{alias}` is already the {what} of deployment "
                        f"`{other[0]}`; clients could not tell them apart, pick another alias",
                    )
                )
            else:
                owners[alias] = (dep_id, "alias")
    return issues


def _shares(dep: Deployment) -> bool:
    return dep.share_gpus or flag_value(dep.args, "--gpu-memory-utilization") is not None


def _utilization(dep: Deployment) -> float:
    value = flag_value(dep.args, "--gpu-memory-utilization")
    try:
        return float(value) if value is not None else DEFAULT_GPU_MEMORY_UTILIZATION
    except ValueError:
        return DEFAULT_GPU_MEMORY_UTILIZATION  # reported by _check_utilization


def _check_utilization(dep: Deployment, at: Loc) -> list[ConfigIssue]:
    value = flag_value(dep.args, "--gpu-memory-utilization")
    if value is None:
        return []
    try:
        ok = 0 < float(value) <= 1
    except ValueError:
        ok = False
    if ok:
        return []
    return [
        ConfigIssue(
            loc=(*at, "args"),
            message=f"--gpu-memory-utilization {value!r} is not a fraction of the GPU's memory; "
            "give a number above 0 and at most 1, e.g. 0.45",
        )
    ]


def _check_shared_memory(
    config: FleetConfig, gpu: int, users: list[str], at: Loc
) -> list[ConfigIssue]:
    """Engines sharing a GPU each take their --gpu-memory-utilization of the whole card."""
    if len(users) < 2:
        return []
    total = sum(_utilization(config.deployments[u]) for u in users)
    if total <= 1.0 + 1e-9:
        return []
    return [
        ConfigIssue(
            loc=at,
            message=f"GPU {gpu} is shared by {', '.join(f'`{u}`' for u in users)}, whose "
            f"--gpu-memory-utilization add up to {total:.2f} of the card (an engine without "
            f"the flag takes {DEFAULT_GPU_MEMORY_UTILIZATION}); the later engine would run out "
            "of memory; set it on each so they add up to at most 1, e.g. 0.45 each",
        )
    ]


def _check_parallelism(dep: Deployment, at: Loc) -> list[ConfigIssue]:
    per_replica = dep.per_replica_gpus()
    tp = flag_value(dep.args, "--tensor-parallel-size", "-tp")
    pp = flag_value(dep.args, "--pipeline-parallel-size", "-pp")
    dp = flag_value(dep.args, "--data-parallel-size", "-dp")
    if per_replica is None or (tp is None and pp is None and dp is None):
        return []
    try:
        wanted = int(tp or 1) * int(pp or 1) * int(dp or 1)
    except ValueError:
        return [
            ConfigIssue(
                loc=(*at, "args"),
                message="--tensor-parallel-size / --pipeline-parallel-size / "
                "--data-parallel-size must be integers",
            )
        ]
    if wanted != per_replica:
        return [
            ConfigIssue(
                loc=(*at, "gpus"),
                message=f"each replica gets {per_replica} GPU(s) but the engine args ask for "
                f"{wanted} (tensor-parallel {tp or 1} × pipeline-parallel {pp or 1} × "
                f"data-parallel {dp or 1}); make them match, or vLLM will fail at start",
            )
        ]
    return []


def _check_template(template: list[str], at: Loc) -> list[ConfigIssue]:
    issues = []
    if not template:
        return [ConfigIssue(loc=at, message="the command is empty; e.g. [vllm, serve, '{model}']")]
    for index, part in enumerate(template):
        for name in _PLACEHOLDER.findall(part):
            if name not in PLACEHOLDERS:
                issues.append(
                    ConfigIssue(
                        loc=(*at, index),
                        message=f"unknown placeholder `{{{name}}}`; known: "
                        + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS),
                    )
                )
    return issues


def _suggest_id(dep_id: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", dep_id.lower()).strip("-._")
    return slug or "my-model"


# ---------------------------------------------------------------- YAML line numbers


@dataclass
class _Lines:
    by_loc: dict[Loc, int]


def _line_index(node: yaml.Node | None) -> _Lines:
    index: dict[Loc, int] = {}

    def walk(n: yaml.Node, loc: Loc) -> None:
        index[loc] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*loc, str(key_node.value))
                walk(value_node, key)
                index[key] = key_node.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*loc, i))

    if node is not None:
        walk(node, ())
    return _Lines(index)


def _number_texts(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, str]:
    """The source text of every plain number in the file, by place."""
    out: dict[Loc, str] = {}
    if isinstance(node, yaml.ScalarNode):
        if node.style is None and node.tag.endswith((":int", ":float")):
            out[loc] = str(node.value)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out.update(_number_texts(value_node, (*loc, str(key_node.value))))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out.update(_number_texts(item, (*loc, index)))
    return out


def _as_written(data: Any, texts: dict[Loc, str], loc: Loc = ()) -> Any:
    """Numbers in engine args, env values and commands become the text as written: YAML
    reads `1.10` as 1.1 and `010` as 8, and the engine must get what the file says."""
    if isinstance(data, dict):
        return {k: _as_written(v, texts, (*loc, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [_as_written(v, texts, (*loc, i)) for i, v in enumerate(data)]
    text_only = loc[:1] == ("engine_command",) or (
        len(loc) > 3 and loc[0] == "deployments" and loc[2] in ("args", "env", "command")
    )
    if text_only and isinstance(data, int | float) and not isinstance(data, bool):
        return texts.get(loc, data)
    return data


def _duplicate_keys(node: yaml.Node | None, loc: Loc = ()) -> list[ConfigIssue]:
    """A key written twice in one mapping: YAML silently keeps the last, so say so."""
    issues: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in first and key != "<<":
                issues.append(
                    ConfigIssue(
                        loc=(*loc, key),
                        message=f"`{key}` is written twice (lines {first[key]} and {line}); "
                        "YAML would silently keep only the last one; remove or rename one",
                        line=line,
                    )
                )
            first.setdefault(key, line)
            issues.extend(_duplicate_keys(value_node, (*loc, key)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            issues.extend(_duplicate_keys(item, (*loc, index)))
    return issues


def _nearest_line(lines: _Lines, loc: Loc) -> int | None:
    for end in range(len(loc), 0, -1):
        line = lines.by_loc.get(loc[:end])
        if line is not None:
            return line
    return None
