"""The gateway's admin routes, decided (pure): `POST /fleet/reload`, `GET /fleet/usage`,
`POST /fleet/deployments/{id}/load` and `/unload` (on-demand deployments, by hand).

Who may reload: with keys set, a request with an admin key (`admin: true` in
gateway.keys, or one of gateway.api_keys); without keys, only a client on this machine
(loopback), since anyone who can reach the gateway could otherwise change the fleet.
The body is optional: `{"file": PATH, "dry_run": true}` (or `?dry_run=1`); without
`file` the fleet re-reads the file it was started with. Loading and unloading a
deployment by hand is allowed to the same callers, and so is restarting one engine
(`POST /fleet/engines/{engine}/restart`, the status page's button). The usage report
and the status page's data need an admin key too (any request when the fleet has no
keys); an engine's metrics (`GET /fleet/engines/{engine}/metrics`) and the Prometheus
targets need what the gateway's own /metrics needs (nothing with gateway.metrics_public).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import unquote

from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.errors import Reply, error_reply

RELOAD_PATH = "/fleet/reload"
USAGE_PATH = "/fleet/usage"
DEPLOYMENTS_PATH = "/fleet/deployments/"
DEPLOYMENT_ACTIONS = ("load", "unload")
USAGE_GROUPS = ("key", "deployment", "both")
ENGINES_PATH = "/fleet/engines/"
ENGINE_ACTIONS = ("metrics", "restart")


@dataclass(frozen=True)
class UsageAsk:
    since: float | None  # unix time; None: everything
    by: str  # one of USAGE_GROUPS


@dataclass(frozen=True)
class DeploymentAsk:
    deployment: str
    action: str  # one of DEPLOYMENT_ACTIONS


@dataclass(frozen=True)
class EngineAsk:
    engine: str  # its name, e.g. qwen-0
    action: str  # one of ENGINE_ACTIONS


@dataclass(frozen=True)
class ReloadAsk:
    file: str | None
    dry_run: bool


def is_loopback(peer: str) -> bool:
    """Whether a client address is this machine's loopback (an IPv4 client of a
    dual-stack listener shows as `::ffff:127.0.0.1`)."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True)
class Asker:
    """Where a request that would change the fleet comes from, beyond its key: its
    peer's address, whether a proxy passed it on (it has X-Forwarded-For), and whether a
    browser sent it from a page of another site (its Origin names another host than its
    Host, or Sec-Fetch-Site says cross-site)."""

    peer: str
    proxied: bool = False
    cross_site: bool = False


def may_change(
    core: Core, asker: Asker | str, api_key: str | None, authorization: str | None, what: str
) -> Reply | None:
    """None when the caller may change the fleet (`what`): an admin key, or without
    keys a client on this machine, not through a proxy, not a page of another site in a
    browser there; else the error to answer."""
    if isinstance(asker, str):
        asker = Asker(asker)
    if core.keys.enabled:
        return core.admin(api_key, authorization, what)
    if asker.cross_site:
        return error_reply(
            403,
            f"{what} was sent by a page of another site (its Origin is not this gateway); "
            "the fleet's own page and `fleet` commands are accepted",
            "forbidden",
        )
    if asker.proxied:
        return error_reply(
            403,
            f"{what} came through a proxy (X-Forwarded-For), so not from this machine; "
            "while the fleet has no keys it is accepted only from this machine: run it "
            "there, or give the fleet an admin key (gateway.keys, gateway.api_keys)",
            "forbidden",
        )
    if not is_loopback(asker.peer):
        return error_reply(
            403,
            f"{what} is accepted only from this machine while the fleet has no keys "
            "(gateway.keys, gateway.api_keys); run it there, or give the fleet an admin key",
            "forbidden",
        )
    return None


def deployment_request(
    core: Core,
    method: str,
    path: str,
    peer: Asker | str,
    api_key: str | None,
    authorization: str | None,
) -> DeploymentAsk | Reply:
    """What `POST /fleet/deployments/{id}/load|unload` asks, or the error to answer."""
    dep_id, _, action = path.removeprefix(DEPLOYMENTS_PATH).partition("/")
    if action not in DEPLOYMENT_ACTIONS or "/" in action:
        return error_reply(
            404,
            f"no such path `{path}`; an admin loads or unloads an on-demand deployment with "
            "POST /fleet/deployments/<deployment>/load or /unload",
            "not_found",
        )
    if method != "POST":
        return error_reply(
            405, f"{path} takes POST", "method_not_allowed", headers={"Allow": "POST"}
        )
    denied = may_change(core, peer, api_key, authorization, path)
    if denied is not None:
        return denied
    adapter = core.config.adapters.get(dep_id)
    if adapter is not None:
        return error_reply(
            409,
            f"`{dep_id}` is a LoRA adapter on the engines of `{adapter.base}`: it is loaded "
            f"with them; {action} `{adapter.base}` instead",
            "adapter_not_loadable",
        )
    if dep_id not in core.config.deployments:
        return error_reply(
            404,
            f"no deployment `{dep_id}`; deployments: {core.names.listing()}",
            "deployment_not_found",
        )
    return DeploymentAsk(dep_id, action)


def metrics_denied(
    core: Core, api_key: str | None, authorization: str | None, what: str
) -> Reply | None:
    """None when the request may read metrics (`what`: /fleet/targets, an engine's
    metrics): anyone with `gateway.metrics_public`, else as the gateway's /metrics."""
    if core.config.gateway.metrics_public:
        return None
    return core.admin(api_key, authorization, what)


def engine_request(
    core: Core,
    method: str,
    path: str,
    peer: Asker | str,
    api_key: str | None,
    authorization: str | None,
) -> EngineAsk | Reply:
    """What `GET /fleet/engines/{engine}/metrics` or `POST .../restart` asks, or the
    error to answer."""
    name, _, action = path.removeprefix(ENGINES_PATH).partition("/")
    if action not in ENGINE_ACTIONS:
        return error_reply(
            404,
            f"no such path `{path}`; an engine's metrics are at GET /fleet/engines/<engine>/"
            "metrics, and an admin restarts one with POST /fleet/engines/<engine>/restart",
            "not_found",
        )
    allowed = ("POST",) if action == "restart" else ("GET", "HEAD")
    if method not in allowed:
        return error_reply(
            405,
            f"{path} takes {' or '.join(allowed)}",
            "method_not_allowed",
            headers={"Allow": ", ".join(allowed)},
        )
    if action == "restart":
        denied = may_change(core, peer, api_key, authorization, path)
    else:
        denied = metrics_denied(core, api_key, authorization, path)
    if denied is not None:
        return denied
    known = [u.name for u in core.registry.all()]
    if name not in known:
        return error_reply(
            404,
            f"no engine `{name}` in the fleet; engines: {', '.join(known) or 'none'}",
            "engine_not_found",
        )
    return EngineAsk(name, action)


def reload_request(
    core: Core,
    method: str,
    query: str,
    body: bytes,
    peer: Asker | str,
    api_key: str | None,
    authorization: str | None,
) -> ReloadAsk | Reply:
    """What a request to /fleet/reload asks, or the error to answer."""
    if method != "POST":
        return error_reply(
            405,
            f"{RELOAD_PATH} takes POST (`fleet reload`, or SIGHUP to `fleet up`)",
            "method_not_allowed",
            headers={"Allow": "POST"},
        )
    denied = may_change(core, peer, api_key, authorization, RELOAD_PATH)
    if denied is not None:
        return denied
    dry_run = any(
        part.partition("=")[0] == "dry_run" and part.partition("=")[2] not in ("", "0", "false")
        for part in query.split("&")
    )
    file: str | None = None
    if body.strip():
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return error_reply(
                400,
                'the body of POST /fleet/reload is a JSON object: {"file": "/path/fleet.yaml", '
                '"dry_run": false}, both optional',
                "invalid_json",
            )
        raw_file, raw_dry = data.get("file"), data.get("dry_run", False)
        if raw_file is not None and (not isinstance(raw_file, str) or not raw_file):
            return error_reply(400, "`file` must be a path (a string)", "invalid_request", "file")
        if not isinstance(raw_dry, bool):
            return error_reply(400, "`dry_run` must be true or false", "invalid_request", "dry_run")
        file, dry_run = raw_file, dry_run or raw_dry
    return ReloadAsk(file, dry_run)


def usage_request(
    core: Core, query: str, api_key: str | None, authorization: str | None
) -> UsageAsk | Reply:
    """What `GET /fleet/usage?since=7d&by=key` asks (an admin key, when keys are set)."""
    denied = core.admin(api_key, authorization, USAGE_PATH)
    if denied is not None:
        return denied
    if core.accounting.ledger is None:
        return error_reply(
            404,
            "this fleet keeps no usage ledger (gateway.usage_db is null); set "
            "gateway.usage_db to a file to have usage counted",
            "no_usage_ledger",
        )
    params = dict(part.partition("=")[::2] for part in query.split("&") if part)
    by = params.get("by", "both")
    if by not in USAGE_GROUPS:
        return error_reply(
            400, f"`by` is one of {', '.join(USAGE_GROUPS)}; got `{by}`", "invalid_request", "by"
        )
    since: float | None = None
    if params.get("since"):
        from vllm_fleet.ledger import parse_since

        try:
            since = parse_since(unquote(params["since"]))
        except ValueError as exc:
            return error_reply(400, str(exc), "invalid_request", "since")
    return UsageAsk(since, by)
