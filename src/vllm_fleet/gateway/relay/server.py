"""The gateway's server: listen, hold the shared state, pace new requests, stop gracefully.

`FastServer` owns the gateway's decisions (`core.Core`), the engine connection pools,
and every client connection. New requests start at most DISPATCH_PER_TURN per turn of
the event loop (`admit`); past `gateway.max_connections` a connection is answered 503.
Idle client connections close after `KEEPALIVE_TIMEOUT` seconds (nginx's default).
Stopping: stop accepting, close idle connections, let requests in flight finish for up
to the grace period, then close what is left.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import deque

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.metrics import ServerCollector
from vllm_fleet.gateway.relay.client import ClientConnection
from vllm_fleet.gateway.relay.upstream import Pools
from vllm_fleet.registry import Registry

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a client connection may be idle (or stall mid-request)
_SWEEP_EVERY = 5.0
# Requests started per turn of the event loop. A burst of new requests is taken a few
# at a time, with the engines' answers (first tokens) relayed in between, instead of
# every new request first: under a burst, streams already running keep flowing and
# early requests get their first token sooner. Light load never reaches the limit.
DISPATCH_PER_TURN = 8
# Open files kept for everything else (engine processes' pipes, logs, listening sockets).
_FILES_RESERVED = 100
# Seconds in-flight requests get to finish when the gateway stops (engines stop next).
SHUTDOWN_GRACE = 5.0


def connection_limit(configured: int | None) -> int:
    """Client connections served at once: as configured, else half the open files this
    process may have (each stream holds a client and an engine socket), less a reserve."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, (soft - _FILES_RESERVED) // 2)


class FastServer:
    def __init__(self, config: FleetConfig, registry: Registry) -> None:
        self.core = Core(config, registry)
        self.max_connections = connection_limit(config.gateway.max_connections)
        self.pools = Pools(config.gateway.connect_timeout)
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._budget = DISPATCH_PER_TURN
        self._turn: asyncio.Handle | None = None
        self._waiting: deque[ClientConnection] = deque()
        self.core.metrics.prometheus.register(ServerCollector(self))

    @property
    def connection_count(self) -> int:
        return len(self.connections)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=2048
        )
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def admit(self, conn: ClientConnection) -> bool:
        """Whether `conn` may start its next request now; if not, it waits its turn
        (in arrival order) and the server calls `conn.dispatch_next()` later."""
        if self._budget > 0 and not self._waiting:
            self._budget -= 1
            self._schedule_turn()
            return True
        if not conn.waiting:
            conn.waiting = True
            self._waiting.append(conn)
        self._schedule_turn()
        return False

    def _schedule_turn(self) -> None:
        if self._turn is None and self._loop is not None:
            self._turn = self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new turn of the event loop (I/O was polled since the last): a new budget,
        spent first on the connections waiting."""
        self._turn = None
        self._budget = DISPATCH_PER_TURN
        waiting = self._waiting
        while waiting and self._budget > 0:
            conn = waiting.popleft()
            conn.waiting = False
            if conn.closed:
                continue
            self._budget -= 1
            conn.dispatch_next()  # (a no-op for a connection closing meanwhile)
        if waiting:
            self._schedule_turn()

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

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
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
