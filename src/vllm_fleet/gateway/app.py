"""The gateway: one OpenAI- and Azure-compatible endpoint in front of every deployment.

`create_app(config, registry)` builds the aiohttp application; it holds no module globals.
Serve it with `vllm_fleet.gateway.server.start_gateway`, which turns on handler
cancellation so a client that disconnects cancels its upstream request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway import proxy
from vllm_fleet.gateway.core import OWN_ENDPOINTS, Core, Forward
from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.proxy import to_response
from vllm_fleet.gateway.routing import remove_dot_segments
from vllm_fleet.registry import Registry, Upstream

log = logging.getLogger(__name__)

SESSION = web.AppKey("session", aiohttp.ClientSession)


class Gateway:
    """The aiohttp handlers of one app, on top of the shared decisions in `core`."""

    def __init__(self, config: FleetConfig, registry: Registry) -> None:
        self.core = Core(config, registry)
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.gateway.connect_timeout
        )

    # ------------------------------------------------------------ gateway endpoints

    async def endpoint(self, request: web.Request) -> web.Response:
        headers = request.headers
        if (repeated := self._repeated(headers)) is not None:
            return to_response(repeated)
        reply = self.core.endpoint(
            request.path,
            request.query_string,
            headers.get("api-key"),
            headers.get("Authorization"),
        )
        return to_response(reply)

    def _repeated(self, headers: CIMultiDictProxy[str]) -> Reply | None:
        """The 400 for a header the gateway decides on sent twice, if any (aiohttp's
        parser refuses a repeated Content-Type itself, with its own 400)."""
        for name in ("Authorization", "api-key"):
            if len(headers.getall(name, ())) > 1:
                return self.core.repeated_header(name)
        return None

    # ------------------------------------------------------------ proxying

    async def forward(self, request: web.Request) -> web.StreamResponse:
        core = self.core
        headers = request.headers
        if (repeated := self._repeated(headers)) is not None:
            return to_response(repeated)
        denied = core.authorize(headers.get("api-key"), headers.get("Authorization"))
        if denied is not None:
            return to_response(denied)
        length = request.content_length
        if length is not None and length > core.max_body:
            return to_response(core.too_large(length))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return to_response(core.too_large(None))
        # Route on the path decoded once with its dot segments resolved, and send the
        # engine that same path encoded again: a path never routes one way and means
        # another to the engine (`/a/../b`), and `%3F` stays data, never a query.
        target = request.rel_url  # the origin form, also of an absolute-form target
        path = remove_dot_segments(unquote(target.raw_path, errors="surrogateescape"))
        decided = core.route(
            request.method,
            path,
            target.raw_query_string,
            headers.get("Content-Type"),
            body,
            True,
        )
        if isinstance(decided, Reply):
            return to_response(decided)
        response = await self.send(request, decided)
        core.counted(decided.deployment, decided.style, response.status)
        return response

    async def send(self, request: web.Request, forward: Forward) -> web.StreamResponse:
        core = self.core
        dep_id = forward.deployment
        headers = proxy.upstream_headers(request)
        session = request.app[SESSION]
        tried: set[Upstream] = set()
        last_error = ""
        while True:
            upstream = core.pick(dep_id, tried)
            if upstream is None:
                if tried:
                    return to_response(core.unreachable(dep_id, last_error))
                return to_response(core.unavailable(dep_id))
            tried.add(upstream)
            upstream.outstanding += 1
            try:
                return await proxy.relay(
                    request, session, upstream, forward.path_qs, forward.body, headers, self.timeout
                )
            except proxy.UpstreamUnreachable as exc:
                last_error = f"{upstream.name}: {exc}"
                log.info("engine %s unreachable, trying another: %s", upstream.name, exc)
            except proxy.UpstreamFailed as exc:
                return to_response(core.upstream_failed(upstream, exc.cause))
            finally:
                upstream.outstanding -= 1


@web.middleware
async def _no_tracebacks(request: web.Request, handler: Any) -> web.StreamResponse:
    """Nothing a client sends may leak a traceback: unexpected errors become a 500 envelope."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status == 405:
            return to_response(
                error_reply(
                    405, f"{request.method} is not allowed on {request.path}", "method_not_allowed"
                )
            )
        if exc.status == 413:
            return to_response(
                error_reply(413, "the request body is too large", "request_too_large")
            )
        return to_response(error_reply(exc.status, exc.reason, "http_error"))
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return to_response(
            error_reply(500, "internal gateway error; see the gateway log", "internal_error")
        )


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
    for path in sorted(OWN_ENDPOINTS):
        app.router.add_get(path, gateway.endpoint)
    app.router.add_route("*", "/{tail:.*}", gateway.forward)
    return app
