"""`fleet` with the prototype raw-protocol client (bench/lean_client.py) in the gateway's
relay, to measure what it would change in the full benchmark:

    python -m bench --fleet "python -m bench.lean_gateway"

For measurement only: the gateway itself is untouched; this swaps
`vllm_fleet.gateway.proxy.relay` in this process before `fleet` runs. Routing, body
rewrite, headers, metrics and everything else are the gateway's own code. Not handled
here (the real client does): connect/read timeouts, HTTPS, the mid-stream error event.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from bench import lean_client
from vllm_fleet.gateway import proxy
from vllm_fleet.registry import Upstream

POOL = lean_client.Pool()


async def lean_relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    path_qs: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> web.StreamResponse:
    url = urlsplit(upstream.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    try:
        answer = await lean_client.request(
            POOL, host, port, request.method, url.path + path_qs, list(headers.items()), body
        )
    except OSError as exc:
        raise proxy.UpstreamUnreachable(str(exc)) from exc
    try:
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        out = response.headers
        for name, value in answer.headers:
            if name.lower() not in proxy._RESPONSE_DROP:
                out.add(name, value)
        out["X-Accel-Buffering"] = "no"
        out["X-Fleet-Upstream"] = upstream.name
        if answer.length is not None and not answer.chunked:
            response.content_length = answer.length
        await response.prepare(request)
        async for chunk in answer.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        answer.done = False  # the client left: drop the engine's connection too
        raise
    finally:
        answer.release()


def main() -> None:
    proxy.relay = lean_relay
    from vllm_fleet.cli import main as fleet

    sys.argv[0] = "fleet"
    fleet()


if __name__ == "__main__":
    main()
