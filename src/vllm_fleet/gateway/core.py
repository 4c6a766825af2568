"""What the gateway decides, apart from how bytes reach it (that is `relay/`'s job).

Who is asking and what they may use (keys.py's table, limits.py's limiter), routing a
request to a deployment, the body's checks and rewrite (body.py), the replica pick, the
503/404 answers, and the gateway's own endpoints. Every
function takes plain values (method, path, header values, body bytes) and returns a
`Forward` (where to send what) or a `Reply` (the answer to give); none does I/O. The
protocol-level relay (`relay/`) sits on top.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway import form, replicas
from vllm_fleet.gateway.accounting import Accounting
from vllm_fleet.gateway.body import (
    Body,
    ask_usage,
    estimate,
    is_json,
    is_multipart,
    mime_type,
    parse_object,
    with_model,
)
from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.keys import Client, KeyTable, admin_only, not_allowed
from vllm_fleet.gateway.limits import Ticket
from vllm_fleet.gateway.metrics import GatewayMetrics
from vllm_fleet.gateway.policies import Hint, Policy, for_fleet
from vllm_fleet.gateway.routing import ByModel, Names, RouteError, Style, Target, match
from vllm_fleet.registry import Registry, State, Upstream
from vllm_fleet.swaps import Phase, phase_of

RETRY_AFTER_LOADING = "10"
RETRY_AFTER_FAILED = "30"

# Characters a path segment may hold unencoded (RFC 3986 pchar, and `/`); `%`, `?` and `#`
# are encoded.
PATH_SAFE = "/:@!$&'()*+,;=-._~"
_ROUTE_CACHE = 1024  # paths whose match() is remembered (the names never change)

# The gateway's own endpoints (GET and HEAD); every other request is proxied.
OWN_ENDPOINTS = frozenset({"/health", "/fleet/status", "/metrics", "/v1/models"})


@dataclass(slots=True)
class Forward:
    """Send `body` to a replica of `deployment` at `path_qs`."""

    deployment: str
    style: Style
    path_qs: str
    body: bytes
    estimate: int = 0  # tokens it may use: its max_tokens (x n) and its prompt's size
    stream: bool = False  # it asked for a stream
    drop_usage: bool = False  # the gateway asked for the usage event; the client did not
    hint: Hint = None  # what its deployment's routing policy read of it


class Queued(Protocol):
    """A request waiting for its on-demand deployment (engines/demand.py's Waiter)."""

    def cancel(self) -> None:
        """The client left: out of the queue, never resumed."""
        ...


class OnDemand(Protocol):
    """The fleet's on-demand deployments, as the gateway reaches them."""

    def enqueue(self, dep_id: str, resume: Callable[[Reply | None], None]) -> Queued | Reply | None:
        """Wait for `dep_id` to be loaded: resumed with None (pick a replica) or with
        the 503 to answer; a Reply to answer now; None when it is not waited for."""
        ...

    def snapshot(self) -> dict[str, Any]: ...

    async def load(self, dep_id: str) -> tuple[int, dict[str, Any]]: ...

    async def unload(self, dep_id: str) -> tuple[int, dict[str, Any]]: ...


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode())


class Core:
    """The request-handling state of one gateway: names, keys, metrics, tie rotation."""

    def __init__(self, config: FleetConfig, registry: Registry, prior: Core | None = None) -> None:
        """`prior`: the core a reload replaces, whose metrics and start time go on."""
        self.config = config
        self.registry = registry
        self.names = Names(config)
        self.metrics: GatewayMetrics = (
            prior.metrics if prior is not None else GatewayMetrics(registry)
        )
        self.keys = KeyTable(config)
        # The ledger and access log are opened by the server (accounting.reconfigure).
        self.accounting: Accounting = (
            prior.accounting if prior is not None else Accounting(self.metrics)
        )
        self.default_max_tokens = config.gateway.default_max_tokens
        self.max_body = config.gateway.max_body_bytes
        self.started: float = prior.started if prior is not None else time.time()
        # On-demand deployments' queues (`fleet up` sets it; None: none are waited for).
        self.demand: OnDemand | None = prior.demand if prior is not None else None
        self._tie = itertools.count()
        # Deployments that route by another policy than least outstanding (`routing:`).
        self.policies: dict[str, Policy] = for_fleet(
            config, prior.policies if prior is not None else {}
        )
        self.metrics.policies = self.policies
        self._counts = self.metrics.requests
        self._failovers = self.metrics.failovers
        self._routes: dict[str, Target | ByModel | RouteError] = {}  # path -> match()

    # ------------------------------------------------------------ keys

    def identify(self, api_key: str | None, authorization: str | None) -> Client | Reply | None:
        """The key's client; the 401 to answer; None when the fleet has no keys."""
        if not self.keys.enabled:
            return None
        return self.keys.identify(api_key, authorization)

    def admin(self, api_key: str | None, authorization: str | None, what: str) -> Reply | None:
        """None when the request may use an admin route (`what`): a key with `admin`, or
        any request when the fleet has no keys; else the 401 or 403."""
        client = self.identify(api_key, authorization)
        if isinstance(client, Reply):
            return client
        if client is not None and not client.admin:
            return admin_only(client, what)
        return None

    def admit(self, client: Client, forward: Forward) -> Ticket | Reply | None:
        """Whether `client` may send `forward` now: the 403 for a deployment it may not
        use, the 429 past one of its limits, or its ticket (None: it has no limits)."""
        if not client.allows(forward.deployment):
            return not_allowed(client, forward.deployment)
        if not client.limited:
            return None
        return self.accounting.limiter.admit(
            client, forward.deployment, forward.estimate, time.monotonic()
        )

    # ------------------------------------------------------------ own endpoints

    def endpoint(
        self, path: str, query: str, api_key: str | None, authorization: str | None
    ) -> Reply:
        """The answer of one of OWN_ENDPOINTS to GET."""
        if path == "/health":
            return self.health(_has_param(query, "ready"))
        if path == "/metrics" and self.config.gateway.metrics_public:
            return self.metrics_reply()
        client = self.identify(api_key, authorization)
        if isinstance(client, Reply):
            return client
        if path == "/v1/models":
            return self.models(client)
        if client is not None and not client.admin:
            return admin_only(client, path)
        if path == "/metrics":
            return self.metrics_reply()
        return self.status()

    def health(self, ready_query: bool) -> Reply:
        deployments: dict[str, dict[str, Any]] = {}
        able = True  # every deployment can answer (an on-demand one by loading)
        for dep_id, ups in self.registry.by_deployment.items():
            ready = sum(1 for u in ups if u.state is State.READY)
            deployments[dep_id] = {"ready": ready, "replicas": len(ups)}
            dep = self.config.deployments.get(dep_id)
            if dep is not None and dep.on_demand:
                phase = phase_of(ups)
                deployments[dep_id]["state"] = phase.value
                able = able and phase is not Phase.FAILED
            else:
                able = able and ready > 0
        for a_id, adapter in self.config.adapters.items():
            ups = self.registry.upstreams(adapter.base)
            ready = sum(1 for u in ups if u.state is State.READY and a_id in u.adapters)
            deployments[a_id] = {"ready": ready, "replicas": len(ups), "base": adapter.base}
            base = self.config.deployments.get(adapter.base)
            loads_later = base is not None and base.on_demand and ready == 0
            able = able and (ready > 0 or (loads_later and phase_of(ups) is not Phase.FAILED))
        # `?ready=1` is for load balancers: 503 until every deployment can answer (an
        # on-demand one that is not loaded can: its requests wait while it loads).
        status = 503 if ready_query and not able else 200
        body = {"status": "ok" if able else "loading", "deployments": deployments}
        return json_reply(body, status)

    def status(self) -> Reply:
        snapshot = self.registry.snapshot()
        if self.demand is not None:
            snapshot["on_demand"] = self.demand.snapshot()
        if self.policies:  # the deployments that route by another policy than the default
            snapshot["routing"] = {d: p.stats() for d, p in self.policies.items()}
        snapshot["gateway"] = {
            "host": self.config.gateway.host,
            "port": self.config.gateway.port,
            "started": round(self.started, 3),
        }
        return json_reply(snapshot)

    def metrics_reply(self) -> Reply:
        return Reply(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    def models(self, client: Client | None = None) -> Reply:
        """The deployments (those `client` may use, when given), each with its state:
        loaded, loading, sleeping, unloaded (on-demand ones), unloading or failed."""
        data = []
        for dep_id, dep in self.config.deployments.items():
            if client is not None and not client.allows(dep_id):
                continue
            ups = self.registry.upstreams(dep_id)
            data.append(
                {
                    "id": dep_id,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "vllm-fleet",
                    "root": dep.model,
                    "parent": None,
                    "aliases": list(dep.aliases),
                    "ready": any(u.state is State.READY for u in ups),
                    "state": phase_of(ups).value,
                    "start": dep.start,
                }
            )
        for a_id, adapter in self.config.adapters.items():
            if client is not None and not client.allows(a_id):
                continue
            ups = self.registry.upstreams(adapter.base)
            base = self.config.deployments.get(adapter.base)
            data.append(
                {
                    "id": a_id,
                    "object": "model",
                    "created": int(self.started),
                    "owned_by": "vllm-fleet",
                    "root": adapter.adapter,
                    "parent": adapter.base,
                    "aliases": list(adapter.aliases),
                    "ready": any(u.state is State.READY and a_id in u.adapters for u in ups),
                    "state": phase_of(ups).value,
                    "start": base.start if base is not None else "always",
                }
            )
        return json_reply({"object": "list", "data": data})

    # ------------------------------------------------------------ proxied requests

    def route(
        self,
        method: str,
        path: str,
        query: str,
        content_type: str | None,
        body: bytes,
        quote_path: bool = False,
        client: Client | None = None,
        lines: Sequence[bytes] = (),
    ) -> Forward | Reply:
        """Where a proxied request goes, with its body rewritten; or the error to answer.

        `path` is decoded; `content_type` is the request's Content-Type header (None when
        absent); `quote_path`: percent-encode the engine's path again (a server that
        decoded the client's path), so what was `%3F` or `%25` stays data. An error that
        lists the deployments lists only those `client` may use; `lines`: the request's
        forwarded header lines (a `session` routing policy reads its header there)."""
        decided = self._route(method, path, query, content_type, body, quote_path, lines)
        if isinstance(decided, Reply) and client is not None and client.deployments is not None:
            return self._listing_for(decided, client)
        return decided

    def _listing_for(self, reply: Reply, client: Client) -> Reply:
        everything = json.dumps(self.names.listing())[1:-1].encode()
        if everything not in reply.body:
            return reply
        mine = ", ".join(self.names.label(i) for i in self.names.ids if client.allows(i))
        body = reply.body.replace(everything, json.dumps(mine or "none")[1:-1].encode())
        return Reply(reply.status, body, reply.content_type, reply.headers)

    def _route(
        self,
        method: str,
        path: str,
        query: str,
        content_type: str | None,
        body: bytes,
        quote_path: bool,
        lines: Sequence[bytes],
    ) -> Forward | Reply:
        route = self._routes.get(path)
        if route is None:
            route = match(path, self.names)
            if len(path) <= 256:
                if len(self._routes) >= _ROUTE_CACHE:
                    self._routes.clear()
                self._routes[path] = route
        if isinstance(route, RouteError):
            return self.route_error(route)
        parsed: Body | None = None
        if isinstance(route, ByModel):
            target = self._by_model(method, path, route, content_type, body)
            if isinstance(target, Reply):
                return target
            dep_id, parsed, body = target
            style, upstream_path = Style.OPENAI, route.upstream_path
        else:
            dep_id, style, upstream_path = route.deployment, route.style, route.upstream_path
            if body and is_json(content_type):
                # Routes that name the deployment set `model` to what its engine serves
                # (in a JSON body, or an upload's form); other bodies pass untouched.
                found_body = parse_object(body)
                if isinstance(found_body, Reply):
                    return found_body
                parsed = found_body
            elif body and content_type is not None and is_multipart(content_type):
                found = form.find_model(body, content_type)
                if isinstance(found, Reply):
                    return found
                body = form.with_model(body, found, self.names.served[dep_id])
        tokens, stream, drop_usage = 0, False, False
        if parsed is not None:
            stream, drop_usage = ask_usage(parsed, upstream_path)
            tokens = estimate(parsed, len(body), upstream_path, self.default_max_tokens)
            rewritten = with_model(parsed, body, self.names.served[dep_id], drop_usage)
            if isinstance(rewritten, Reply):
                return rewritten
            body = rewritten
        if style is Style.AZURE and query:
            query = "&".join(p for p in query.split("&") if p and not p.startswith("api-version="))
        if quote_path:
            upstream_path = quote(upstream_path, safe=PATH_SAFE, errors="surrogateescape")
        path_qs = f"{upstream_path}?{query}" if query else upstream_path
        policy = self.policies.get(dep_id) if self.policies else None
        hint = policy.hint(parsed, lines) if policy is not None else None
        return Forward(dep_id, style, path_qs, body, tokens, stream, drop_usage, hint)

    def _by_model(
        self, method: str, path: str, route: ByModel, content_type: str | None, body: bytes
    ) -> tuple[str, Body | None, bytes] | Reply:
        if not body:
            return error_reply(
                400 if method == "POST" else 404,
                f"{method} {path} needs a deployment: send a JSON body with "
                f"`model`, or use /<deployment>{route.upstream_path}; deployments: "
                f"{self.names.listing()}",
                "model_required",
                "model",
            )
        if content_type is not None and is_multipart(content_type):
            found = form.find_model(body, content_type)
            if isinstance(found, Reply):
                return found
            form_dep = self.names.resolve(found.value)
            if isinstance(form_dep, RouteError):
                return self.route_error(form_dep)
            return form_dep, None, form.with_model(body, found, self.names.served[form_dep])
        if not is_json(content_type):
            shown = mime_type(content_type or "")
            return error_reply(
                400,
                f"{path} routes by the body's `model` (JSON, or a multipart form); for "
                f"{shown} use /<deployment>{route.upstream_path}; "
                f"deployments: {self.names.listing()}",
                "unsupported_content_type",
            )
        parsed = parse_object(body)
        if isinstance(parsed, Reply):
            return parsed
        dep_id = self.names.resolve(parsed.get("model"))
        if isinstance(dep_id, RouteError):
            return self.route_error(dep_id)
        return dep_id, parsed, body

    def route_error(self, error: RouteError) -> Reply:
        return error_reply(error.status, error.message, error.code, error.param)

    def too_large(self, length: int | None) -> Reply:
        limit_mb = self.config.gateway.max_body_mb
        size = f" ({length} bytes)" if length is not None else ""
        return error_reply(
            413,
            f"the request body{size} is over the gateway's limit of {limit_mb:g} MB; "
            "send less, or raise gateway.max_body_mb in the fleet file",
            "request_too_large",
        )

    # ------------------------------------------------------------ replicas

    def pick(self, dep_id: str, tried: set[Upstream], hint: Hint = None) -> Upstream | None:
        """The replica for the next try of a request: ready, in the rotation, not `tried`
        yet, chosen by the deployment's routing policy (`hint`: what it read of the
        request); by default the fewest outstanding requests (`replicas.pick`, ties
        rotate). An adapter's: an engine of its base that holds it."""
        base = self.names.bases.get(dep_id)
        if base is None:
            candidates = self.registry.upstreams(dep_id)
        else:
            candidates = [u for u in self.registry.upstreams(base) if dep_id in u.adapters]
        turn = next(self._tie) if len(candidates) > 1 else 0
        policy = self.policies.get(dep_id) if self.policies else None
        if policy is not None:
            return policy.pick(candidates, tried, hint, turn)
        return replicas.pick(candidates, tried, turn)

    def engines_of(self, dep_id: str) -> str:
        """The deployment whose engines serve `dep_id`: its base for an adapter, else
        itself (what an on-demand load is asked for)."""
        return self.names.bases.get(dep_id, dep_id)

    def failed_over(self, upstream: Upstream) -> None:
        """A request that `upstream` failed before its first byte goes to another replica
        (fleet_upstream_failovers_total)."""
        key = (upstream.deployment, upstream.name)
        self._failovers[key] = self._failovers.get(key, 0) + 1

    def unreachable(self, dep_id: str, failures: Sequence[str]) -> Reply:
        """Every replica tried refused the connection or timed out connecting: down, not
        broken mid-request (an engine that just died and is restarting, or a remote
        endpoint that is not up). Each is out of the rotation until a health check passes."""
        return error_reply(
            503,
            f"no engine of deployment `{dep_id}` accepts connections "
            f"({'; '.join(failures)}); it may be restarting, retry shortly",
            "upstream_unreachable",
            headers={"Retry-After": RETRY_AFTER_LOADING},
        )

    def unanswered(self, dep_id: str, failures: Sequence[str]) -> Reply:
        """Every replica tried failed before answering, one at least after it took the
        connection (it closed or reset it unanswered)."""
        return error_reply(
            502,
            f"every engine of deployment `{dep_id}` tried failed before answering "
            f"({'; '.join(failures)}); see `fleet status` and the engine logs, and retry",
            "upstream_error",
        )

    def unavailable(self, dep_id: str) -> Reply:
        """No replica of `dep_id` is ready: say whether it loads, failed, or stops."""
        base = self.names.bases.get(dep_id)
        if base is not None:
            return self._adapter_unavailable(dep_id, base)
        ups = self.registry.upstreams(dep_id)
        now = time.time()
        loading = [u for u in ups if u.state in (State.STARTING, State.STOPPED)]
        if loading:
            detail = ", ".join(
                f"{u.name} {u.state.value} for {now - u.since:.0f} s" for u in loading
            )
            return error_reply(
                503,
                f"deployment `{dep_id}` is still loading ({detail}); retry shortly",
                "deployment_loading",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        unreachable = [u for u in ups if u.state is State.UNREACHABLE]
        if unreachable:
            why = "; ".join(f"{u.name} ({u.url}): {u.message}" for u in unreachable)
            return error_reply(
                503,
                f"no endpoint of deployment `{dep_id}` is answering ({why}); retry shortly",
                "upstream_unreachable",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        ejected = [u for u in ups if u.state is State.READY and u.ejected is not None]
        if ejected:
            why = "; ".join(f"{u.name}: {u.ejected}" for u in ejected)
            return error_reply(
                503,
                f"no engine of deployment `{dep_id}` accepts connections ({why}); each "
                "is out of the rotation until its next health check passes, retry shortly",
                "upstream_unreachable",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        failed = [u for u in ups if u.state is State.FAILED]
        if failed:
            why = "; ".join(f"{u.name}: {u.message or 'failed'}" for u in failed)
            return error_reply(
                503,
                f"every engine of deployment `{dep_id}` has failed ({why}); "
                "see `fleet status` and the engine logs",
                "deployment_failed",
                headers={"Retry-After": RETRY_AFTER_FAILED},
            )
        idle = [u for u in ups if u.state in (State.UNLOADED, State.SLEEPING, State.UNLOADING)]
        if idle:
            return error_reply(
                503,
                f"deployment `{dep_id}` is not loaded ({', '.join(u.state.value for u in idle)}; "
                "start: on_demand) and its request could not wait; retry shortly",
                "deployment_not_loaded",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        return error_reply(
            503,
            f"deployment `{dep_id}` has no ready engine (stopping); retry shortly",
            "deployment_unavailable",
            headers={"Retry-After": RETRY_AFTER_LOADING},
        )

    def _adapter_unavailable(self, dep_id: str, base: str) -> Reply:
        """No engine of the adapter's base holds it: its base is not ready (said as for
        the base), or the adapter failed to load (vLLM's words) or is loading."""
        ups = self.registry.upstreams(base)
        ready = [u for u in ups if u.state is State.READY]
        if not ready:
            reply = self.unavailable(base)
            body = reply.body.replace(b"deployment `", f"adapter `{dep_id}` on ".encode(), 1)
            return Reply(reply.status, body, reply.content_type, reply.headers)
        failed = [
            f"{u.name}: {u.adapter_errors[dep_id]}" for u in ready if dep_id in u.adapter_errors
        ]
        if failed and len(failed) == len(ready):
            return error_reply(
                503,
                f"adapter `{dep_id}` could not be loaded on the engines of `{base}` "
                f"({'; '.join(failed)}); fix it in the fleet file and reload, see `fleet status`",
                "adapter_failed",
                headers={"Retry-After": RETRY_AFTER_FAILED},
            )
        return error_reply(
            503,
            f"adapter `{dep_id}` is being loaded on the engines of `{base}`; retry shortly",
            "adapter_loading",
            headers={"Retry-After": RETRY_AFTER_LOADING},
        )

    def upstream_failed(self, upstream: Upstream, exc: BaseException) -> Reply:
        """The engine accepted the request but broke before answering."""
        return error_reply(
            502,
            f"engine {upstream.name} ({upstream.url}) failed before answering: "
            f"{exc or 'the connection broke'}",
            "upstream_error",
        )

    # ------------------------------------------------------------ metrics

    def counted(self, dep_id: str, style: Style, status: int) -> None:
        """One more request answered (in flight is the upstreams' `outstanding`)."""
        key = (dep_id, style.value, status)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1


def _has_param(query: str, name: str) -> bool:
    """Whether the query string sets `name` to something non-empty (`?ready=1`)."""
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == name and value:
            return True
    return False
