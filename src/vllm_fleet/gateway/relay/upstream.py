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
from collections.abc import Callable
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from vllm_fleet.gateway.relay.wire import RESPONSE_DROP, connection_tokens

log = logging.getLogger(__name__)

IDLE_CLOSE = 4.0  # seconds an idle engine connection is kept (uvicorn closes at 5 s)


class Sink(Protocol):
    """Where an engine connection delivers one response (the relay's exchange)."""

    def on_head(self, status: int, lines: list[bytes], framing: Framing) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_flush(self) -> None: ...
    def on_end(self) -> None: ...
    def on_fail(self, exc: BaseException | None, retry: bool) -> None: ...


class Framing:
    """How the engine delimits the body of its response (and whether it is SSE)."""

    __slots__ = ("chunked", "length", "sse", "until_close")

    def __init__(self, chunked: bool, length: int | None, until_close: bool, sse: bool) -> None:
        self.chunked = chunked
        self.length = length
        self.until_close = until_close
        self.sse = sse  # text/event-stream


class UpstreamClosed(ConnectionError):
    """The engine closed the connection before it finished its answer."""


class EngineConnection(asyncio.Protocol):
    __slots__ = (
        "_chunked",
        "_connection",
        "_framing",
        "_got_bytes",
        "_in_head",
        "_interim",
        "_length",
        "_lines",
        "_reusable",
        "_sse",
        "closed",
        "head_only",
        "idle_since",
        "parser",
        "paused",
        "pool",
        "reused",
        "sink",
        "transport",
    )

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Sink | None = None
        self.closed = False
        self.reused = False
        self.paused = False  # reading paused: the client cannot take more yet
        self._reusable = False  # the answer ended; back to the pool after this read
        self.idle_since = 0.0
        self.head_only = False
        self._got_bytes = False
        self._in_head = True
        self._lines: list[bytes] = []  # response header lines to relay
        self._connection: bytes | None = None  # the engine's Connection header
        self._length: int | None = None
        self._chunked = False
        self._sse = False
        self._interim = False
        self._framing: Framing | None = None

    # ------------------------------------------------------------ driven by the exchange

    def send(self, sink: Sink, data: bytes, head_only: bool) -> None:
        self.sink = sink
        self.head_only = head_only
        self._got_bytes = False
        self._framing = None
        self._reset_head()
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection (the client left): the engine aborts the request."""
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
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
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamClosed):
                self._stray()
                return
            # Our own code failed in a callback: say so, then fail the exchange.
            log.error("unexpected error relaying a response", exc_info=cause or exc)
            self._broken(exc)
            return
        except httptools.HttpParserError as exc:
            self._broken(exc)
            return
        if self._reusable:
            self._reusable = False
            if not self.closed:
                self.pool.release(self)  # (which reads again if a slow client paused it)
            return
        sink = self.sink
        if sink is not None:
            sink.on_flush()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends or fails the exchange

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        if self.sink is None:
            # An answer nobody asked for (bytes behind a bodiless answer, in the same
            # read): the connection's framing cannot be trusted any more.
            raise UpstreamClosed("the engine sent an answer to no request")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # trailers: not relayed
        lname = name.lower()
        if lname in RESPONSE_DROP:
            if lname == b"connection":
                self._connection = value
            elif lname == b"content-length":
                self._length = int(value)
            elif lname == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            return
        if lname == b"content-type":
            self._sse = value.startswith(b"text/event-stream")
        self._lines.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 1xx (e.g. 103 Early Hints): not relayed
            self._reset_head()
            return
        self._in_head = False
        self._interim = False
        chunked, length = self._chunked, self._length
        if self._connection is not None and (listed := connection_tokens(self._connection)):
            # Headers the engine's `Connection` names are for this hop only.
            self._lines = [
                line for line in self._lines if line.split(b":", 1)[0].lower() not in listed
            ]
        no_body = self.head_only or status in (204, 304)
        until_close = not (chunked or no_body) and length is None
        framing = self._framing = Framing(chunked, length, until_close, self._sse)
        sink = self.sink
        if sink is not None:
            sink.on_head(status, self._lines, framing)
        if self.head_only:
            # llhttp cannot be told the request was HEAD: take the head alone, and do not
            # reuse the connection (its parser would wait for the announced body).
            self._finish(reusable=False)

    def _reset_head(self) -> None:
        self._connection = None
        self._in_head = True
        self._lines = []
        self._length = None
        self._chunked = False
        self._sse = False

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
        if sink is not None:
            sink.on_flush()  # before the release: a full client pauses this connection
        if reusable and not self.closed:
            # Back to the pool once llhttp has seen the whole read: bytes behind the
            # answer would be an answer to no request, and close the connection instead.
            self._reusable = True
        elif self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.on_end()

    def _stray(self) -> None:
        """Close a connection that sent more than its answer."""
        self._reusable = False
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()
        sink = self.sink
        self.sink = None
        if sink is not None:
            sink.on_flush()
            sink.on_fail(UpstreamClosed("the engine sent more than its answer"), False)

    def _broken(self, exc: BaseException) -> None:
        sink = self.sink
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_flush()
            sink.on_fail(exc, False)


class EnginePool:
    """Idle keep-alive connections to one engine URL (most recently used first): an
    `http(s)://` URL, or `unix:/path` for an engine on a Unix socket (sent `Host:
    localhost`)."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.url = url
        self.uds: str | None = url[len("unix:") :] if url.startswith("unix:") else None
        parts = urlsplit(url if self.uds is None else "http://localhost")
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

    def connect(self, done: Callable[[EngineConnection | BaseException], None]) -> None:
        """Open a fresh connection; `done` gets it, or the OSError / TimeoutError when
        the engine is not there. One task, and a timer for the connect timeout."""
        loop = asyncio.get_running_loop()
        opening = (
            loop.create_unix_connection(lambda: EngineConnection(self), self.uds)
            if self.uds is not None
            else loop.create_connection(
                lambda: EngineConnection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
        )
        task = loop.create_task(opening)
        timer = loop.call_later(self.connect_timeout, task.cancel)

        def finished(task: asyncio.Task[tuple[asyncio.BaseTransport, EngineConnection]]) -> None:
            timer.cancel()
            if task.cancelled():
                done(TimeoutError(f"no connection within {self.connect_timeout:g} s"))
                return
            exc = task.exception()
            if exc is not None:
                done(exc)
                return
            conn = task.result()[1]
            conn.reused = False
            done(conn)

        task.add_done_callback(finished)

    def release(self, conn: EngineConnection) -> None:
        conn.resume()  # paused for a slow client as its answer ended: read again
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
