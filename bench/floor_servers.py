"""Reference proxies for `python -m bench.floor`, each as small as its kind allows.

    python -m bench.floor_servers KIND PORT UPSTREAM_PORT

- `aiohttp-server`: aiohttp's web server answering a fixed completion itself (no upstream):
  the server side's own cost per request.
- `aiohttp-relay`: aiohttp server + aiohttp ClientSession relaying to the upstream, with
  nothing else (no routing, body rewrite, metrics): the floor of the gateway's design.
- `lean-relay`: aiohttp server + the prototype raw-protocol client in bench/lean_client.py.
- `raw-relay`: no web framework at all, bench/raw_relay.py (protocols on both sides).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from bench import lean_client, raw_relay
from bench.upstream import Chunks

UPSTREAM = web.AppKey("upstream", int)
SESSION = web.AppKey("session", aiohttp.ClientSession)
POOL = web.AppKey("pool", lean_client.Pool)
_DROP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
BODY = Chunks().body(16).split(b"\r\n\r\n", 1)[1]  # the upstream's own 16-token answer


async def server_only(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def aiohttp_relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = f"http://127.0.0.1:{request.app[UPSTREAM]}{request.path_qs}"
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].request(request.method, url, data=body, headers=headers) as r:
        response = web.StreamResponse(status=r.status, reason=r.reason)
        response.content_type = r.content_type
        if r.content_length is not None:
            response.content_length = r.content_length
        await response.prepare(request)
        async for chunk in r.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def lean_relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream = await lean_client.request(
        request.app[POOL],
        "127.0.0.1",
        request.app[UPSTREAM],
        request.method,
        request.path_qs,
        [("Content-Type", "application/json")],
        body,
    )
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers:
            if name.lower() not in _DROP:
                response.headers.add(name, value)
        if upstream.length is not None and not upstream.chunked:
            response.content_length = upstream.length
        await response.prepare(request)
        async for chunk in upstream.chunks():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


HANDLERS: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "aiohttp-server": server_only,
    "aiohttp-relay": aiohttp_relay,
    "lean-relay": lean_relay,
}


async def serve(kind: str, port: int, upstream: int) -> None:
    app = web.Application()
    app[UPSTREAM] = upstream
    app[POOL] = lean_client.Pool()

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
            app[SESSION] = s
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", HANDLERS[kind])
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    await asyncio.Event().wait()  # until the benchmark stops the process


def main() -> None:
    kind, port, upstream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import uvloop

    if kind == "raw-relay":
        uvloop.run(raw_relay.serve(port, upstream))
    else:
        uvloop.run(serve(kind, port, upstream))


if __name__ == "__main__":
    main()
