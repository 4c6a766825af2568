"""Forward one request to an engine and relay the answer's bytes as they arrive.

The hot path: no parsing of response bodies, no per-chunk work beyond `write`, one shared
connection pool (keep-alive) for every engine. SSE is never buffered. When the client goes
away the handler is cancelled (the server runs with handler cancellation), which closes
the upstream connection, and vLLM aborts the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from vllm_fleet.gateway.errors import Reply, sse_error_event
from vllm_fleet.registry import Upstream

log = logging.getLogger(__name__)

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those the
# proxy recomputes itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_REQUEST_DROP = _HOP_BY_HOP | {"api-key", "expect", "proxy-connection", "x-real-ip"}
_RESPONSE_DROP = _HOP_BY_HOP | {"date", "server"}


def to_response(reply: Reply) -> web.Response:
    """The aiohttp response for a reply the gateway makes itself."""
    response = web.Response(status=reply.status, body=reply.body)
    response.headers["Content-Type"] = reply.content_type
    for name, value in reply.headers:
        response.headers[name] = value
    return response


class UpstreamUnreachable(Exception):
    """The engine could not be connected to; nothing was sent, so another may be tried."""


class UpstreamFailed(Exception):
    """The engine took the request but broke before answering (the gateway says 502)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _named_in_connection(lines: Iterable[str]) -> set[str]:
    """Headers a message names in `Connection` are hop-by-hop too (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for line in lines for token in line.split(",")}


def upstream_headers(request: web.Request) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _named_in_connection(request.headers.getall("Connection", ()))
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        if name.lower() not in drop:
            headers.add(name, value)
    # Azure clients send their key as `api-key`; engines started with --api-key expect a
    # bearer token.
    api_key = request.headers.get("api-key")
    if api_key and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {api_key}"
    peer = request.remote or ""
    prior = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Real-IP"] = peer  # the peer, never what the client claims
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return headers


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    path_qs: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> web.StreamResponse:
    """Send the request to `upstream` and stream its answer back to the client."""
    # Sent exactly as built (encoded=True): yarl would otherwise normalize dot segments
    # and re-quote the path and query.
    url = URL(upstream.url + path_qs, encoded=True)
    try:
        upstream_response = await session.request(
            request.method,
            url,
            data=body if body else None,
            headers=headers,
            allow_redirects=False,
            timeout=timeout,
            auto_decompress=False,
        )
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
        # ServerDisconnected here is a pooled keep-alive connection the engine closed
        # (e.g. it restarted); nothing was answered, so trying again is safe.
        raise UpstreamUnreachable(str(exc)) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamFailed(exc) from exc
    try:
        response = web.StreamResponse(
            status=upstream_response.status, reason=upstream_response.reason
        )
        out = response.headers
        received = upstream_response.headers
        drop = _RESPONSE_DROP | _named_in_connection(received.getall("Connection", ()))
        for name, value in received.items():
            if name.lower() not in drop:
                out.add(name, value)
        out["X-Accel-Buffering"] = "no"
        out["X-Fleet-Upstream"] = upstream.name
        length = upstream_response.content_length
        if length is not None and "Transfer-Encoding" not in upstream_response.headers:
            response.content_length = length
        await response.prepare(request)
        is_sse = upstream_response.content_type == "text/event-stream"
        try:
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectionResetError):
                raise  # the client went away: nothing more to say to it
            log.warning("engine %s broke off mid-response: %s", upstream.name, exc)
            if is_sse:
                await response.write(
                    sse_error_event(
                        f"engine {upstream.name} broke off the stream: {type(exc).__name__}",
                        "upstream_disconnected",
                    )
                )
            else:
                # The status line is gone already; dropping the connection is the only
                # honest signal left for a non-streamed body.
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response
    except (ConnectionResetError, aiohttp.ClientConnectionResetError, asyncio.CancelledError):
        upstream_response.close()  # the client left: drop the engine's connection too
        raise
    finally:
        upstream_response.release()
