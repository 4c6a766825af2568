"""Serving the gateway on a socket, with either server (`gateway.server` in the fleet file).

- `aiohttp`: the aiohttp application of `app.py` (handler cancellation on, so a client
  that disconnects cancels its upstream request; access log off).
- `fast`: the protocol-level relay of `relay/` (uvloop + llhttp, no web framework).

Both make the same decisions (`core.py`) and answer the same way.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.app import create_app
from vllm_fleet.gateway.relay import FastServer
from vllm_fleet.registry import Registry

# Seconds in-flight requests get to finish when the gateway stops (engines stop next).
SHUTDOWN_GRACE = 5.0


class RunningGateway(Protocol):
    async def stop_accepting(self) -> None:
        """Stop accepting connections; requests in flight go on."""

    async def close(self) -> None:
        """Let requests in flight finish (up to SHUTDOWN_GRACE), then close everything."""


async def start_gateway(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Bind and start serving an aiohttp app; raises OSError when the address is taken.

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


class _AiohttpGateway:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    async def stop_accepting(self) -> None:
        for site in list(self.runner.sites):
            await site.stop()

    async def close(self) -> None:
        await self.runner.cleanup()


class _FastGateway:
    def __init__(self, server: FastServer) -> None:
        self.server = server

    async def stop_accepting(self) -> None:
        await self.server.stop_accepting()

    async def close(self) -> None:
        await self.server.close(SHUTDOWN_GRACE)


async def serve(config: FleetConfig, registry: Registry, host: str, port: int) -> RunningGateway:
    """Start the server `config.gateway.server` names on host:port (OSError when taken)."""
    if config.gateway.server == "fast":
        server = FastServer(config, registry)
        await server.start(host, port)
        return _FastGateway(server)
    return _AiohttpGateway(await start_gateway(create_app(config, registry), host, port))
