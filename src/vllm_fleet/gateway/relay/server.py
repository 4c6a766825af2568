"""The fast server: listen, hold the shared state, stop with a grace period.

`FastServer` owns the gateway's decisions (`core.Core`), the engine connection pools,
and every client connection. Idle client connections close after `KEEPALIVE_TIMEOUT`
seconds (aiohttp's default). Stopping: stop accepting, close idle connections, let
requests in flight finish for up to the grace period, then close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.relay.client import ClientConnection
from vllm_fleet.gateway.relay.upstream import Pools
from vllm_fleet.registry import Registry

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a client connection may be idle (or stall mid-request)
_SWEEP_EVERY = 5.0


class FastServer:
    def __init__(self, config: FleetConfig, registry: Registry) -> None:
        self.core = Core(config, registry)
        self.pools = Pools(config.gateway.connect_timeout)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=2048
        )
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def _sweep(self) -> None:
        limit = time.monotonic() - KEEPALIVE_TIMEOUT
        for conn in list(self.connections):
            # Idle between requests, or stalled inside one before it could be answered.
            if not conn.busy and conn.last_active < limit:
                conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)

    def check_drained(self) -> None:
        """While closing: note when no connection has a request in flight any more."""
        if self.closing and all(c.idle() for c in self.connections):
            self._drained.set()

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self, grace: float) -> None:
        """Stop; requests in flight get `grace` seconds to finish."""
        await self.stop_accepting()
        self.closing = True
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        self.check_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), grace)
        except TimeoutError:
            busy = sum(1 for c in self.connections if not c.idle())
            log.warning("closing %d connections with requests in flight", busy)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pools.close()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports run connection_lost
