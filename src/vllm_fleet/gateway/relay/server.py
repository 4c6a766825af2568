"""The gateway's server: listen, sweep idle connections, stop gracefully.

`RelayServer` builds the state its client connections share (`state.ServerState`: the
gateway's decisions in `core`, the connections, the limit), the engine connection pools
and the pacing of new requests (`admission.Admission`), then only binds, sweeps and closes
by walking `state.connections`. Past `gateway.max_connections` a connection is answered
503. Idle client connections close after `KEEPALIVE_TIMEOUT` seconds (nginx's default).
Stopping: stop accepting, close idle connections, let requests in flight finish for up
to the grace period, then close what is left.

With `gateway.tls` the socket serves TLS (the context from `gateway/tls.py`); the
handshake must end within `gateway.header_timeout`, and a client that speaks plain HTTP
to it fails the handshake (nothing is answered, nothing else is disturbed). A reload's
certificate is taken by the connections accepted after it (`use_tls`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
import time

from vllm_fleet.config import FleetConfig
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.metrics import ServerCollector
from vllm_fleet.gateway.relay.admission import Admission
from vllm_fleet.gateway.relay.client import ClientConnection
from vllm_fleet.gateway.relay.state import Control, ServerState
from vllm_fleet.gateway.relay.upstream import Pools
from vllm_fleet.registry import Registry

log = logging.getLogger(__name__)

KEEPALIVE_TIMEOUT = 75.0  # seconds a client connection may be idle (or stall mid-request)
_SWEEP_EVERY = 5.0
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


class RelayServer:
    def __init__(
        self, config: FleetConfig, registry: Registry, control: Control | None = None
    ) -> None:
        core = Core(config, registry)
        self.state = ServerState(core, connection_limit(config.gateway.max_connections))
        self.state.control = control
        self.pools = Pools(config.gateway.connect_timeout)
        self.admission = Admission()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None  # the context new connections get
        core.metrics.prometheus.register(ServerCollector(self))

    @property
    def core(self) -> Core:
        return self.state.core

    def reconfigure(self, config: FleetConfig) -> None:
        """A reload's new fleet file: names, keys and limits from the next request on
        (one in flight keeps the core it began with); engine connections keep their
        pools. The listening address is never changed here (a reload refuses that)."""
        state = self.state
        state.core = Core(config, state.core.registry, prior=state.core)
        state.core.accounting.reconfigure(config)
        state.max_connections = connection_limit(config.gateway.max_connections)
        self.pools.connect_timeout = config.gateway.connect_timeout
        for pool in self.pools.pools.values():
            pool.connect_timeout = config.gateway.connect_timeout

    @property
    def max_connections(self) -> int:
        return self.state.max_connections

    @property
    def connection_count(self) -> int:
        return len(self.state.connections)

    @property
    def waiting_count(self) -> int:
        return self.admission.waiting_count

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Bind and serve (HTTPS with `tls`); raises OSError when the address is taken."""
        loop = asyncio.get_running_loop()
        state, pools, admission = self.state, self.pools, self.admission
        state.core.accounting.reconfigure(state.core.config)  # the ledger, the access log
        if tls is not None:
            self._tls = tls
            # The server keeps the context it was started with; each handshake switches
            # to the latest one (`use_tls`) as soon as the client's hello is read.
            tls.sni_callback = self._pick_tls
        self._server = await loop.create_server(
            lambda: ClientConnection(state, pools, admission),
            host,
            port,
            reuse_address=True,
            backlog=2048,
            ssl=tls,
            ssl_handshake_timeout=state.core.config.gateway.header_timeout if tls else None,
        )
        self._sweeper = loop.call_later(_SWEEP_EVERY, self._sweep)

    @property
    def tls(self) -> bool:
        return self._tls is not None

    def use_tls(self, context: ssl.SSLContext) -> None:
        """A reload's certificate: connections accepted from now on get it, open ones
        keep theirs. Only for a server started with TLS (a reload refuses turning it on
        or off)."""
        if self._tls is None:
            raise RuntimeError("the gateway was started without TLS")
        self._tls = context

    def _pick_tls(
        self, conn: ssl.SSLObject, server_name: str | None, started: ssl.SSLContext
    ) -> None:
        current = self._tls
        if current is not None and current is not started:
            conn.context = current

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def _sweep(self) -> None:
        now = time.monotonic()
        limit = now - KEEPALIVE_TIMEOUT
        header_timeout = self.state.core.config.gateway.header_timeout
        head_limit = now - header_timeout
        for conn in list(self.state.connections):
            # Idle between requests, or stalled inside one before it could be answered.
            if not conn.busy and conn.last_active < limit:
                conn.close()
            elif conn.head_overdue(head_limit):  # trickling a head in (slowloris)
                conn.head_timed_out(header_timeout)
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_EVERY, self._sweep)

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float, cut_short: asyncio.Event | None = None) -> bool:
        """Stop accepting and let requests in flight finish: True once none is left, False
        when `grace` seconds pass or `cut_short` is set first. Idle connections close at
        once, busy ones as their request ends; no new request starts on any of them."""
        await self.stop_accepting()
        state = self.state
        state.closing = True
        for conn in list(state.connections):
            if conn.idle():
                conn.close()
        state.check_drained()
        waits = [asyncio.ensure_future(state.drained.wait())]
        if cut_short is not None:
            waits.append(asyncio.ensure_future(cut_short.wait()))
        try:
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if state.drained.is_set():
            return True
        busy = sum(1 for c in state.connections if not c.idle())
        log.warning("%d connections still have requests in flight", busy)
        return False

    async def close(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop; requests in flight get `grace` seconds to finish, then are cut off."""
        state = self.state
        if not state.drained.is_set():
            await self.drain(grace)
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(state.tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pools.close()
        state.core.accounting.close()  # the ledger's last batch, the access log's last lines
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports run connection_lost
