"""Serving the gateway app on a socket, with the settings the proxy relies on."""

from __future__ import annotations

from aiohttp import web

# Seconds in-flight requests get to finish when the gateway stops (engines stop next).
SHUTDOWN_GRACE = 5.0


async def start_gateway(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Bind and start serving; raises OSError when the address is taken.

    Handler cancellation is on: a client that disconnects cancels its handler, which
    closes the upstream connection so the engine aborts the request. The access log is
    off on the hot path (the gateway counts requests in /metrics instead).
    """
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=2048)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
