"""Pooled keep-alive connections to the engines, one pool per engine URL.

Each `EngineConnection` is an asyncio.Protocol that carries one exchange at a time: it
writes the request bytes it is given and feeds the engine's answer to llhttp
(httptools.HttpResponseParser), handing the head, body bytes and end to the exchange's
`Sink` as they arrive. Idle connections close after `IDLE_CLOSE` seconds, below
uvicorn's (vLLM's) own 5 s, so a request is never sent on a connection the engine is
closing; when a reused connection is still found closed before any response byte, the
sink is told the attempt may be retried on a fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

log = logging.getLogger(__name__)

IDLE_CLOSE = 4.0  # seconds an idle engine connection is kept (uvicorn closes at 5 s)


class Sink(Protocol):
    """Where an engine connection delivers one response (the relay's exchange)."""

    def on_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: Framing
    ) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_flush(self) -> None: ...
    def on_end(self) -> None: ...
    def on_fail(self, exc: BaseException | None, retry: bool) -> None: ...


class Framing:
    """How the engine delimits the body of its response."""

    __slots__ = ("chunked", "length", "until_close")

    def __init__(self, chunked: bool, length: int | None, until_close: bool) -> None:
        self.chunked = chunked
        self.length = length
        self.until_close = until_close


class UpstreamClosed(ConnectionError):
    """The engine closed the connection before it finished its answer."""


class EngineConnection(asyncio.Protocol):
    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.head_only = False
        self._got_bytes = False
        self._in_head = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._interim = False
        self._framing: Framing | None = None

    # ------------------------------------------------------------ driven by the exchange

    def send(self, sink: Sink, data: bytes, head_only: bool) -> None:
        self.sink = sink
        self.head_only = head_only
        self._got_bytes = False
        self._framing = None
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection (the client left): the engine aborts the request."""
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        framing = self._framing
        if framing is not None and framing.until_close:
            sink.on_flush()
            sink.on_end()  # a body delimited by the close: this is its end
        elif not self._got_bytes:
            sink.on_fail(exc or UpstreamClosed("the engine closed the connection"), self.reused)
        else:
            sink.on_fail(exc or UpstreamClosed("the engine closed the connection"), False)

    def data_received(self, data: bytes) -> None:
        if self.sink is None:
            if self.transport is not None:
                self.transport.close()  # bytes nobody asked for: this connection is done
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(exc)
            return
        sink = self.sink
        if sink is not None:
            sink.on_flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends or fails the exchange

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._headers = []
        self._reason = b""

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not trailers
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 1xx (e.g. 103 Early Hints): not relayed
            return
        self._interim = False
        chunked = False
        length: int | None = None
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        no_body = self.head_only or status in (204, 304)
        until_close = not (chunked or no_body) and length is None
        framing = self._framing = Framing(chunked, length, until_close)
        sink = self.sink
        if sink is not None:
            sink.on_head(status, self._reason, self._headers, framing)
        if self.head_only:
            # llhttp cannot be told the request was HEAD: take the head alone, and do not
            # reuse the connection (its parser would wait for the announced body).
            self._finish(reusable=False)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.sink is None:
            return
        self._finish(reusable=self.parser.should_keep_alive())

    # ------------------------------------------------------------ internals

    def _finish(self, reusable: bool) -> None:
        sink = self.sink
        self.sink = None
        self._framing = None
        if reusable and not self.closed:
            self.pool.release(self)
        elif self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.on_flush()
            sink.on_end()

    def _broken(self, exc: BaseException) -> None:
        sink = self.sink
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_flush()
            sink.on_fail(exc, False)


class EnginePool:
    """Idle keep-alive connections to one engine URL (most recently used first)."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self.base_path = parts.path.rstrip("/")
        self.host_header = (parts.netloc or self.host).encode("idna")
        self.connect_timeout = connect_timeout
        self.idle: list[EngineConnection] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def take_idle(self) -> EngineConnection | None:
        """The most recently used idle connection that is still fresh enough, if any."""
        idle = self.idle
        limit = time.monotonic() - IDLE_CLOSE
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                continue
            if conn.idle_since < limit:
                transport.close()
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self) -> EngineConnection:
        """A fresh connection; raises OSError or TimeoutError when the engine is not there."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                lambda: EngineConnection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            ),
            self.connect_timeout,
        )
        conn.reused = False
        return conn

    def release(self, conn: EngineConnection) -> None:
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(1.0, self._sweep)

    def forget(self, conn: EngineConnection) -> None:
        if self.idle and conn in self.idle:
            self.idle.remove(conn)

    def _sweep(self) -> None:
        """Close connections idle for IDLE_CLOSE seconds (the oldest are first)."""
        self._sweeper = None
        limit = time.monotonic() - IDLE_CLOSE
        idle = self.idle
        expired = 0
        while expired < len(idle) and idle[expired].idle_since < limit:
            expired += 1
        for conn in idle[:expired]:
            if conn.transport is not None:
                conn.transport.close()
        del idle[:expired]
        if idle:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class Pools:
    """One EnginePool per engine URL, made on first use."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.pools: dict[str, EnginePool] = {}

    def get(self, url: str) -> EnginePool:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = EnginePool(url, self.connect_timeout)
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
