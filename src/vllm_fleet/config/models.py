"""The fleet file's pydantic models: every key of fleet.yaml, its type, default and bounds.

Single fields are checked here; rules that span fields or deployments are `checks.py`'s,
and `loading.py` reads a file into these models.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from vllm_fleet.config.problems import Loc
from vllm_fleet.config.yaml_source import Lines, nearest_line


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


def _sleep_level(value: Any) -> Any:
    """`sleep: true` is no level (pydantic would take it as 1); `${VAR}` gives text."""
    if isinstance(value, bool):
        raise ValueError(
            "`sleep` is a level of vLLM's sleep mode, not a yes/no: 0 (stop the engine), "
            "1 (weights offloaded to CPU memory) or 2 (weights dropped); e.g. `sleep: 1`"
        )
    if isinstance(value, str) and value.strip() in ("0", "1", "2"):
        return int(value)
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
# A deployment id (and a swap group's name): URL-safe, as it becomes a path segment.
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ID_MAX_LEN = 63

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


KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
KEY_NAME_RULE = (
    "1-64 letters, digits, `.`, `_`, `@`, `-`, starting with a letter or digit (e.g. team-a)"
)
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
PositiveInt = Annotated[int, Field(ge=1)]


def key_digest(key: str) -> str:
    """The SHA-256 of a key, as the fleet file stores it (lowercase hex)."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyLimits(_Strict):
    """Limits on one key (or on one key for one deployment): requests and tokens per
    minute, requests at once. None: no limit."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None

    _numbers = field_validator("rpm", "tpm", "max_concurrent", mode="before")(lambda v: _no_bool(v))


class KeyConfig(KeyLimits):
    """A named client key: which deployments it reaches, its limits, whether it may
    administer the fleet, until when it is valid. Stored as its SHA-256 (`key_sha256`);
    a plain `key` (best as `${VAR}`) is hashed at load."""

    name: str
    key_sha256: str | None = None
    key: Annotated[str, Field(min_length=1)] | None = None
    deployments: list[str] | Literal["*"] = "*"
    # Per deployment (each one of `deployments`): limits for this key on it alone.
    limits: dict[str, KeyLimits] = Field(default_factory=dict)
    admin: bool = False
    # The last day the key works (inclusive, UTC).
    expires: datetime.date | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not KEY_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"`{value}` is not a key name: {KEY_NAME_RULE}")
        return value

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_PATTERN.fullmatch(value.lower()):
            raise ValueError(
                "not a SHA-256 digest (64 hex digits); `fleet keys new NAME` prints a key "
                "and its digest"
            )
        return value.lower() if value is not None else None

    @field_validator("expires", mode="before")
    @classmethod
    def _date_only(cls, value: Any) -> Any:
        if isinstance(value, datetime.datetime) or (
            isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip())
        ):
            raise ValueError("write the last valid day as YYYY-MM-DD (e.g. 2027-06-30)")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(
                "give the key as `key_sha256: <digest>` (from `fleet keys new NAME`) or as "
                "`key: ${VAR}`, exactly one of the two"
            )
        return self

    @property
    def digest(self) -> str:
        """The key's SHA-256, from `key_sha256` or hashed from `key`."""
        return self.key_sha256 if self.key_sha256 is not None else key_digest(self.key or "")

    def allows(self, deployment: str) -> bool:
        return self.deployments == "*" or deployment in self.deployments

    def limits_own(self) -> KeyLimits:
        """The limits on the key across all its deployments."""
        return KeyLimits(rpm=self.rpm, tpm=self.tpm, max_concurrent=self.max_concurrent)


class TlsConfig(_Strict):
    """HTTPS for the gateway: PEM files, relative to the fleet file."""

    cert: Annotated[str, Field(min_length=1)]
    key: Annotated[str, Field(min_length=1)]


# Request headers the gateway reads or replaces itself (gateway/relay/request.py), which
# reach no routing policy as the client sent them.
GATEWAY_HEADERS = frozenset(
    {
        "host", "content-length", "connection", "expect", "api-key", "authorization",
        "upgrade", "transfer-encoding", "te", "trailer", "trailers", "keep-alive",
        "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
    }
)  # fmt: skip


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_mb: Annotated[float, Field(gt=0)] = 32.0
    # Keys clients must present (Bearer or `api-key`); empty means no auth at the gateway.
    # Each is a key with every deployment, no limits, and admin rights; `keys` names them.
    api_keys: list[str] = Field(default_factory=list)
    keys: list[KeyConfig] = Field(default_factory=list)
    # /metrics without a key even when keys are set (for a Prometheus scraper).
    metrics_public: bool = False
    # Tokens reserved for a request that sets no max_tokens, against a key's `tpm`.
    default_max_tokens: Annotated[int, Field(ge=1)] = 1024
    # The usage ledger (SQLite), relative to the fleet file; null: no ledger.
    usage_db: Annotated[str, Field(min_length=1)] | None = ".fleet/usage.db"
    # One JSON line per request, relative to the fleet file; null: none.
    access_log: Annotated[str, Field(min_length=1)] | None = None
    tls: TlsConfig | None = None
    # Start engines so they accept any `model` (for a front end that cannot rewrite bodies).
    accept_any_model: bool = False
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    # Client connections served at once; beyond, a 503. None: what the open-files limit
    # allows (two sockets per stream).
    max_connections: Annotated[int, Field(ge=1)] | None = None
    # A request head (request line and headers) must arrive whole within this many seconds
    # of its first byte, or the client gets 408 and the connection closes (slowloris;
    # nginx's client_header_timeout). Checked every few seconds.
    header_timeout: Annotated[float, Field(gt=0)] = 60.0
    # After an answer given before the whole request was read (413, 401, 400, 503): what
    # the client still sends is read and dropped, then the connection closes (nginx's
    # lingering close, its defaults): for at most lingering_time seconds in all, until
    # lingering_timeout seconds pass without a byte, and at most lingering_max_mb dropped.
    # lingering_time 0 closes at once.
    lingering_time: Annotated[float, Field(ge=0)] = 30.0
    lingering_timeout: Annotated[float, Field(gt=0)] = 5.0
    lingering_max_mb: Annotated[float, Field(gt=0)] = 128.0
    # The request header that names a session, for deployments with `routing: session`.
    session_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = "x-session-id"

    _host = field_validator("host")(lambda v: _check_host(v))

    @field_validator("session_header")
    @classmethod
    def _session_header(cls, value: str) -> str:
        if value.lower() in GATEWAY_HEADERS:
            raise ValueError(
                f"`{value}` is a header the gateway reads or replaces itself, never passed on "
                "as sent, so no session can be named by it; name another header "
                "(the default is x-session-id)"
            )
        return value

    _numbers = field_validator(
        "port", "max_body_mb", "connect_timeout", "max_connections", "header_timeout",
        "lingering_time", "lingering_timeout", "lingering_max_mb", "default_max_tokens",
        mode="before",
    )(lambda v: _no_bool(v))  # fmt: skip

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def lingering_max_bytes(self) -> int:
        return int(self.lingering_max_mb * 1024 * 1024)


class EnginesConfig(_Strict):
    """Defaults for every engine the fleet starts."""

    log_dir: str = ".fleet/logs"
    base_port: Port = 8100
    start_timeout: Annotated[float, Field(gt=0)] = 1800.0
    stop_timeout: Annotated[float, Field(ge=0)] = 30.0
    # Requests in flight get this long to finish before an engine is stopped: on
    # SIGTERM/SIGINT (for every engine), and on a reload (for an engine removed or
    # replaced). vLLM engines also get it as `--shutdown-timeout`.
    drain_timeout: Annotated[float, Field(ge=0)] = 30.0
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
    # Local engines listen on Unix domain sockets here (`listen: uds`, the default), in a
    # directory only the fleet's user can open (0700); relative to the fleet file. A socket
    # path is at most 107 bytes: the plan says when this one is too deep.
    socket_dir: Annotated[str, Field(min_length=1)] = ".fleet/sockets"
    # A group that may open the sockets too (nginx's worker user's): the directory becomes
    # 0750 and the sockets 0660, owned by this group.
    socket_group: Annotated[str, Field(min_length=1)] | None = None

    _numbers = field_validator(
        "base_port", "start_timeout", "stop_timeout", "drain_timeout", "health_interval",
        "max_restarts", "backoff_initial", "backoff_max", "stable_after", "log_max_mb",
        "log_keep", "stall_timeout", "vllm_port_base", "vllm_port_span", mode="before",
    )(lambda v: _no_bool(v))  # fmt: skip

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
    # How the gateway reaches the engine: `uds`, a Unix socket in engines.socket_dir that
    # no other user can open (the command's `{uds}`, or `--uds PATH` added); `tcp`, the
    # command's `{host}`/`{port}` (an engine without `--uds`, or nginx in front).
    listen: Literal["uds", "tcp"] = "uds"
    # `always`: started with the fleet. `on_demand`: started by the first request for it
    # (which waits in a queue meanwhile); the fields below apply to on-demand ones only.
    start: Literal["always", "on_demand"] = "always"
    # Seconds without requests before the engine is unloaded (stopped, or put to sleep
    # with `sleep`); None: kept loaded until another member of its swap group needs it.
    idle_timeout: Annotated[float, Field(gt=0)] | None = None
    # vLLM's sleep mode at this level instead of stopping: 1 offloads the weights to CPU
    # memory, 2 drops them; 0 stops the engine.
    sleep: Literal[0, 1, 2] = 0
    # On-demand deployments that take turns on the same GPUs: those sharing a GPU form
    # one group by themselves; a name joins deployments that list no GPU in common too.
    swap_group: str | None = Field(default=None, json_schema_extra={"pattern": ID_PATTERN.pattern})
    # A request waits this long for the engine to load, and at most this many wait.
    queue_timeout: Annotated[float, Field(gt=0)] = 300.0
    max_queued: Annotated[int, Field(ge=0)] = 64
    # Swapped out, a member's requests in flight get this long to finish; once loaded, it
    # keeps the GPUs at least this long before another member may take them.
    swap_drain_timeout: Annotated[float, Field(ge=0)] = 30.0
    min_hold: Annotated[float, Field(ge=0)] = 10.0
    # Which replica takes a request (gateway/policies/): the fewest in flight; each in
    # turn; the one that served the longest prefix of its prompt (vLLM's prefix cache);
    # the same one per session (gateway.session_header, or the body's `user`).
    routing: Literal["least_outstanding", "round_robin", "prefix", "session"] = "least_outstanding"

    _coerce_args = field_validator("args", "env", "command", mode="before")(
        lambda v: _stringify_scalars(v)
    )
    _numbers = field_validator(
        "gpus", "port", "replicas", "idle_timeout", "queue_timeout", "max_queued",
        "swap_drain_timeout", "min_hold", mode="before",
    )(lambda v: _no_bool(v))  # fmt: skip
    _sleep = field_validator("sleep", mode="before")(lambda v: _sleep_level(v))
    _host = field_validator("host")(lambda v: _check_host(v))

    @field_validator("swap_group")
    @classmethod
    def _group_name(cls, value: str | None) -> str | None:
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise ValueError(
                f"`{value}` is not a swap group name: at most {ID_MAX_LEN} lowercase "
                "letters, digits, `.`, `_` and `-`, starting with a letter or digit "
                "(e.g. big-models)"
            )
        return value

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
    def on_demand(self) -> bool:
        """Started by its first request, not with the fleet (`start: on_demand`)."""
        return self.start == "on_demand"

    @property
    def served_as(self) -> str:
        """The name the engine answers with, and the gateway rewrites `model` to."""
        return self.served_name or self.model

    def per_replica_gpus(self) -> int | None:
        if self.gpus is None:
            return None
        count = self.gpus if isinstance(self.gpus, int) else len(self.gpus)
        return count // self.replicas if isinstance(self.gpus, list) else count


# A Hugging Face repository id (`org/name`), as an adapter may be given instead of a path.
HF_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class Adapter(_Strict):
    """A LoRA adapter served as a deployment of its own on its base deployment's engines
    (vLLM's multi-LoRA): `adapter:` a PEFT adapter directory (relative to the fleet file)
    or a Hugging Face id, `base:` the deployment whose model it was trained on. It has no
    engine and no GPU of its own; the fleet loads it into every replica of its base at
    run time (`/v1/load_lora_adapter`), so adding or removing one restarts nothing."""

    adapter: Annotated[str, Field(min_length=1)]
    base: Annotated[str, Field(min_length=1)]
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # Its LoRA rank (PEFT's `r`), for the base's `--max-lora-rank`; read from the
    # directory's adapter_config.json when the fleet can (a local adapter).
    rank: Annotated[int, Field(ge=1)] | None = None
    # Found at load (config/adapters.py): the rank in adapter_config.json, and what the
    # engine loads (the absolute directory, or the Hugging Face id).
    _read_rank: int | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)

    _numbers = field_validator("rank", mode="before")(lambda v: _no_bool(v))

    @property
    def lora_rank(self) -> int | None:
        """The rank as written, else as read from the adapter; None: unknown."""
        return self.rank if self.rank is not None else self._read_rank


class FleetConfig(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    engine_command: list[str] = Field(default_factory=lambda: ["vllm", "serve", "{model}"])
    deployments: dict[str, Deployment]
    # LoRA adapters: written under `deployments` (with `adapter:` and `base:`); the
    # loader moves them here, so `deployments` holds the ones that run engines.
    adapters: dict[str, Adapter] = Field(default_factory=dict)
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
        return self.path_of(self.engines.log_dir)

    def path_of(self, value: str) -> Path:
        """A path the fleet file gives, resolved from the file's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def adapters_on(self, base: str) -> dict[str, Adapter]:
        """The adapters served on deployment `base`'s engines, in file order."""
        return {a_id: a for a_id, a in self.adapters.items() if a.base == base}

    def adapter_path(self, adapter: Adapter) -> str:
        """What the engine loads: the adapter's absolute directory, or its Hugging Face id
        (as the loader found it; a directory beside the fleet file otherwise)."""
        if adapter._source is not None:
            return adapter._source
        return str(self.path_of(adapter.adapter))

    def deployment_ids(self) -> list[str]:
        """Every deployment a client may name: those with engines, then the adapters."""
        return [*self.deployments, *self.adapters]
