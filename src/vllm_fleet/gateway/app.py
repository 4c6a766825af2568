"""The gateway: one OpenAI- and Azure-compatible endpoint in front of every deployment.

`create_app(config, registry)` builds the aiohttp application; it holds no module globals.
Serve it with `vllm_fleet.gateway.server.start_gateway`, which turns on handler
cancellation so a client that disconnects cancels its upstream request.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway import proxy
from vllm_fleet.gateway.errors import error_response
from vllm_fleet.gateway.metrics import GatewayMetrics
from vllm_fleet.gateway.routing import ByModel, Names, RouteError, Style, match
from vllm_fleet.registry import Registry, State, Upstream

log = logging.getLogger(__name__)

SESSION = web.AppKey("session", aiohttp.ClientSession)
RETRY_AFTER_LOADING = "10"
RETRY_AFTER_FAILED = "30"


class Gateway:
    """Request handling state shared by the handlers of one app."""

    def __init__(self, config: FleetConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.names = Names(config)
        self.metrics = GatewayMetrics(registry)
        self.keys = [k.encode() for k in config.gateway.api_keys]
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.gateway.connect_timeout
        )
        self._tie = itertools.count()
        self.started = time.time()

    # ------------------------------------------------------------ gateway endpoints

    async def health(self, request: web.Request) -> web.Response:
        deployments = {
            dep_id: {
                "ready": sum(1 for u in ups if u.state is State.READY),
                "replicas": len(ups),
            }
            for dep_id, ups in self.registry.by_deployment.items()
        }
        all_ready = all(d["ready"] > 0 for d in deployments.values())
        # `?ready=1` is for load balancers: 503 until every deployment can answer.
        status = 503 if request.query.get("ready") and not all_ready else 200
        body = {"status": "ok" if all_ready else "loading", "deployments": deployments}
        return web.json_response(body, status=status)

    async def status(self, request: web.Request) -> web.Response:
        if (denied := self.authorize(request)) is not None:
            return denied
        snapshot = self.registry.snapshot()
        snapshot["gateway"] = {
            "host": self.config.gateway.host,
            "port": self.config.gateway.port,
            "started": round(self.started, 3),
        }
        return web.json_response(snapshot)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self.authorize(request)) is not None:
            return denied
        data = []
        for dep_id, dep in self.config.deployments.items():
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
                }
            )
        return web.json_response({"object": "list", "data": data})

    # ------------------------------------------------------------ proxying

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if (denied := self.authorize(request)) is not None:
            return denied
        route = match(request.path, self.names)
        if isinstance(route, RouteError):
            return self.route_error(route)
        body_or_error = await self.read_body(request)
        if isinstance(body_or_error, web.Response):
            return body_or_error
        body = body_or_error
        if isinstance(route, ByModel):
            target = self.by_model(request, route, body)
            if isinstance(target, web.Response):
                return target
            dep_id, body, style, path = target[0], target[1], Style.OPENAI, route.upstream_path
        else:
            dep_id, style, path = route.deployment, route.style, route.upstream_path
            rewritten = self.rewrite_model(request, body, dep_id)
            if isinstance(rewritten, web.Response):
                return rewritten
            body = rewritten
        query = request.query_string
        if style is Style.AZURE:
            query = "&".join(p for p in query.split("&") if p and not p.startswith("api-version="))
        path_qs = f"{path}?{query}" if query else path
        response = await self.send(request, dep_id, path_qs, body)
        self.metrics.requests.labels(dep_id, style.value, str(response.status)).inc()
        return response

    async def send(
        self, request: web.Request, dep_id: str, path_qs: str, body: bytes
    ) -> web.StreamResponse:
        headers = proxy.upstream_headers(request)
        session = request.app[SESSION]
        tried: set[Upstream] = set()
        last_error = ""
        while True:
            upstream = self.pick(dep_id, tried)
            if upstream is None:
                if tried:
                    # Down, not broken mid-request: an engine that just died (the
                    # supervisor restarts it) or a remote endpoint that is not up.
                    return error_response(
                        503,
                        f"no engine of deployment `{dep_id}` accepts connections "
                        f"({last_error}); it may be restarting, retry shortly",
                        "upstream_unreachable",
                        headers={"Retry-After": RETRY_AFTER_LOADING},
                    )
                return self.unavailable(dep_id)
            tried.add(upstream)
            upstream.outstanding += 1
            in_flight = self.metrics.in_flight.labels(dep_id)
            in_flight.inc()
            try:
                return await proxy.relay(
                    request, session, upstream, path_qs, body, headers, self.timeout
                )
            except proxy.UpstreamUnreachable as exc:
                last_error = f"{upstream.name}: {exc}"
                log.info("engine %s unreachable, trying another: %s", upstream.name, exc)
            finally:
                upstream.outstanding -= 1
                in_flight.dec()

    def pick(self, dep_id: str, exclude: set[Upstream]) -> Upstream | None:
        """The ready replica with the fewest outstanding requests (ties rotate)."""
        best: Upstream | None = None
        candidates = self.registry.upstreams(dep_id)
        if not candidates:
            return None
        start = next(self._tie) % len(candidates)
        for up in candidates[start:] + candidates[:start]:
            if up.state is not State.READY or up in exclude:
                continue
            if best is None or up.outstanding < best.outstanding:
                best = up
        return best

    def unavailable(self, dep_id: str) -> web.Response:
        ups = self.registry.upstreams(dep_id)
        now = time.time()
        loading = [u for u in ups if u.state in (State.STARTING, State.STOPPED)]
        if loading:
            detail = ", ".join(
                f"{u.name} {u.state.value} for {now - u.since:.0f} s" for u in loading
            )
            return error_response(
                503,
                f"deployment `{dep_id}` is still loading ({detail}); retry shortly",
                "deployment_loading",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        failed = [u for u in ups if u.state is State.FAILED]
        if failed:
            why = "; ".join(f"{u.name}: {u.message or 'failed'}" for u in failed)
            return error_response(
                503,
                f"every engine of deployment `{dep_id}` has failed ({why}); "
                "see `fleet status` and the engine logs",
                "deployment_failed",
                headers={"Retry-After": RETRY_AFTER_FAILED},
            )
        return error_response(
            503,
            f"deployment `{dep_id}` has no ready engine (stopping); retry shortly",
            "deployment_unavailable",
            headers={"Retry-After": RETRY_AFTER_LOADING},
        )

    # ------------------------------------------------------------ bodies and names

    async def read_body(self, request: web.Request) -> bytes | web.Response:
        limit = self.config.gateway.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return self.too_large(length)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self.too_large(None)

    def too_large(self, length: int | None) -> web.Response:
        limit_mb = self.config.gateway.max_body_mb
        size = f" ({length} bytes)" if length is not None else ""
        return error_response(
            413,
            f"the request body{size} is over the gateway's limit of {limit_mb:g} MB; "
            "send less, or raise gateway.max_body_mb in the fleet file",
            "request_too_large",
        )

    def by_model(
        self, request: web.Request, route: ByModel, body: bytes
    ) -> tuple[str, bytes] | web.Response:
        if not body:
            return error_response(
                400 if request.method == "POST" else 404,
                f"{request.method} {request.path} needs a deployment: send a JSON body with "
                f"`model`, or use /<deployment>{route.upstream_path}; deployments: "
                f"{self.names.listing()}",
                "model_required",
                "model",
            )
        if not _is_json(request):
            return error_response(
                400,
                f"{request.path} routes by the JSON body's `model`; for uploads "
                f"({request.content_type}) use /<deployment>{route.upstream_path}; "
                f"deployments: {self.names.listing()}",
                "unsupported_content_type",
            )
        parsed = _parse_object(body)
        if isinstance(parsed, web.Response):
            return parsed
        dep_id = self.names.resolve(parsed.get("model"))
        if isinstance(dep_id, RouteError):
            return self.route_error(dep_id)
        return dep_id, _with_model(parsed, body, self.names.served[dep_id])

    def rewrite_model(self, request: web.Request, body: bytes, dep_id: str) -> bytes | web.Response:
        """Routes that name the deployment set `model` to what its engine serves."""
        if not body or not _is_json(request):
            return body  # multipart uploads and bodiless requests pass through untouched
        parsed = _parse_object(body)
        if isinstance(parsed, web.Response):
            return parsed
        return _with_model(parsed, body, self.names.served[dep_id])

    def route_error(self, error: RouteError) -> web.Response:
        return error_response(error.status, error.message, error.code, error.param)

    def authorize(self, request: web.Request) -> web.Response | None:
        if not self.keys:
            return None
        presented = request.headers.get("api-key", "")
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        candidate = presented.encode()
        if any(hmac.compare_digest(candidate, key) for key in self.keys):
            return None
        return error_response(
            401,
            "missing or wrong API key; send `Authorization: Bearer <key>` (or Azure's "
            "`api-key: <key>`) with one of the keys in gateway.api_keys",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _is_json(request: web.Request) -> bool:
    ctype = request.content_type  # aiohttp says application/octet-stream when absent
    return (
        ctype == "application/json"
        or ctype.endswith("+json")
        or (ctype == "application/octet-stream" and "Content-Type" not in request.headers)
    )


def _parse_object(body: bytes) -> dict[str, Any] | web.Response:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return error_response(
            400,
            f"the request body is not valid JSON ({exc}); send a JSON object",
            "invalid_json",
        )
    if not isinstance(parsed, dict):
        return error_response(
            400,
            f"the request body must be a JSON object, not {type(parsed).__name__}",
            "invalid_json",
        )
    return parsed


def _with_model(parsed: dict[str, Any], body: bytes, served: str) -> bytes:
    if parsed.get("model") == served:
        return body  # already right: forward the client's bytes as they are
    parsed["model"] = served
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()


@web.middleware
async def _no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
    """Nothing a client sends may leak a traceback: unexpected errors become a 500 envelope."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status == 405:
            return error_response(
                405, f"{request.method} is not allowed on {request.path}", "method_not_allowed"
            )
        if exc.status == 413:
            return error_response(413, "the request body is too large", "request_too_large")
        return error_response(exc.status, exc.reason, "http_error")
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return error_response(500, "internal gateway error; see the gateway log", "internal_error")


def create_app(config: FleetConfig, registry: Registry) -> web.Application:
    gateway = Gateway(config, registry)
    app = web.Application(
        client_max_size=config.gateway.max_body_bytes, middlewares=[_no_tracebacks]
    )

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # Idle engine connections close after 4 s, before vLLM's (uvicorn's) own 5 s idle
        # timeout: a request is never sent on a connection the engine is closing.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        ) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/fleet/status", gateway.status)
    app.router.add_get("/metrics", gateway.metrics_endpoint)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_route("*", "/{tail:.*}", gateway.forward)
    return app
