"""One client connection of the gateway: llhttp parses, requests answer in order.

httptools.HttpRequestParser turns the bytes into requests (keep-alive, pipelining,
chunked bodies, HTTP/1.0). Requests queue in arrival order and are answered one at a
time; a request is handled once its whole body is in (the `model` rewrite needs it).
`Expect: 100-continue` is answered when its request is next. Limits: the URL, the head
and the body (`gateway.max_body_mb`); a request over one, a malformed request or an
Upgrade gets its error after the answers before it, and the connection closes. Such
an early answer (and a 401 for a request with a body, given at its head) is followed by
a lingering close (`linger.py`), so it reaches a client still sending its body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

import httptools

from vllm_fleet.gateway.admin import DEPLOYMENTS_PATH, RELOAD_PATH, USAGE_PATH
from vllm_fleet.gateway.core import OWN_ENDPOINTS
from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.relay import console, control, wire
from vllm_fleet.gateway.relay.admission import Admission
from vllm_fleet.gateway.relay.exchange import Exchange
from vllm_fleet.gateway.relay.linger import Linger
from vllm_fleet.gateway.relay.request import (
    HOST_VALUE,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_URL,
    Reject,
    Request,
    decode_target,
    engine_headers,
    internal_error,
    over_limit,
)
from vllm_fleet.gateway.relay.state import ServerState
from vllm_fleet.gateway.relay.upstream import Pools
from vllm_fleet.gateway.usage import Meter

log = logging.getLogger(__name__)

# Pipelined requests held (complete, waiting their turn) before the connection stops
# reading; and the body bytes they may hold together, so a client pipelining big bodies
# cannot make the gateway hold many of them (checked as each request ends: the one being
# read may add up to gateway.max_body_mb on top).
MAX_QUEUED = 8
MAX_QUEUED_BYTES = 1 << 20
OVER_LIMIT_GRACE = 5.0  # seconds an over-the-limit connection may take to send a head
# A request with a body has its key checked at its head (401 there, the body never read),
# but for these methods, checked once the request is read: a GET or HEAD may be for an
# endpoint of the gateway's own that needs no key (/health, /metrics).
_LATE_AUTH = frozenset({"GET", "HEAD"})


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_advancing",
        "admission",
        "broken",
        "busy",
        "closed",
        "exchange",
        "last_active",
        "linger",
        "method_before",
        "over_limit",
        "parser",
        "peer_bytes",
        "pools",
        "progress",
        "queue",
        "queued_bytes",
        "read_paused",
        "scheme",
        "shut",
        "stalled",
        "state",
        "transport",
        "waiting",
        "write_paused",
    )

    def __init__(self, state: ServerState, pools: Pools, admission: Admission) -> None:
        self.state = state
        self.pools = pools
        self.admission = admission
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer_bytes = b""
        self.scheme = b"http"
        self.queue: deque[Request] = deque()
        self.queued_bytes = 0  # body bytes of the requests in the queue, all together
        self.exchange: Exchange | None = None
        self.busy = False  # the request at the head of the queue is being answered
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self.broken = False  # the parser stopped: answer what is queued, then close
        self.shut = False  # close() was called: nothing more is written, lingering or not
        self.last_active = time.monotonic()
        self.progress = False  # this read began a request, ended a head, a body or a chunk
        self.stalled = 0  # bytes of reads since, that ended inside a request
        self.waiting = False  # in the admission's queue, waiting for a turn
        self.method_before = b""
        self.over_limit = False  # accepted past gateway.max_connections: answered 503
        self.linger: Linger | None = None  # made when the parser stops inside a request
        self._advancing = False

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_bytes = str(peer[0]).encode() if isinstance(peer, tuple) else b""
        self.scheme = b"https" if transport.get_extra_info("sslcontext") is not None else b"http"
        state = self.state
        if len(state.connections) >= state.max_connections:
            # Over the limit: its request is answered 503 and the connection closed (a
            # silent one soon), so the gateway keeps the sockets it needs for the rest.
            self.over_limit = True
            asyncio.get_running_loop().call_later(OVER_LIMIT_GRACE, self._close_if_silent)
        state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.connections.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()
            if self.busy and self.queue:
                self.state.core.accounting.finished(self.queue[0], self.peer_bytes, cut=True)
        self.queue.clear()
        self.queued_bytes = 0
        self.state.check_drained()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            # The parser stopped: what the client still sends is dropped (and counted,
            # when it stopped inside a request; see linger.py).
            if self.linger is not None:
                self.linger.dropped(len(data), self.transport)
            return
        self.last_active = time.monotonic()
        self.progress = False
        rest = b""  # bytes after a declined h2c offer, parsed as HTTP/1.1
        try:
            self.parser.feed_data(data)
            if not self.queue or self.queue[-1].complete or self.progress:
                self.stalled = 0
            else:
                # A read that ended inside a request and moved no part of it along: an
                # unfinished header or trailer line, which llhttp keeps (and on_header
                # cannot see yet). Bound what such reads add up to.
                self.stalled += len(data)
                if self.stalled > MAX_URL + MAX_HEAD:
                    raise Reject(
                        error_reply(
                            431,
                            f"the request has a header or trailer line over {MAX_HEAD} bytes",
                            "headers_too_large",
                        )
                    )
        except Reject as exc:
            self._break(exc.reply)
        except httptools.HttpParserUpgrade as exc:
            last = self.queue[-1] if self.queue else None
            if last is not None and last.h2c_offer:
                # The offer is declined by answering over HTTP/1.1; llhttp goes on with
                # the bytes after it as HTTP/1.1 too.
                last.complete = True
                offset = int(exc.args[0]) if exc.args else len(data)
                rest = data[offset:]
            else:
                # The Upgrade request carries its error (on_headers_complete); what
                # follows it is another protocol's bytes: stop reading.
                self.broken = True
                self._will_linger()
                if last is not None:
                    last.complete = True
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Reject):
                self._break(cause.reply)
            else:
                log.error("unexpected error parsing a request", exc_info=cause or exc)
                self._break(internal_error())
        except httptools.HttpParserError as exc:
            self._break(
                error_reply(
                    400, f"malformed HTTP request ({exc}); send HTTP/1.1", "invalid_request"
                )
            )
        if rest:
            # Outside the except block: parsed inside it, a callback's Reject would reach
            # us as the HttpParserUpgrade (its __context__), hence a 500.
            self.data_received(rest)
            return
        self._advance()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume()

    # ------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.progress = True
        self.method_before = self.parser.get_method()  # the last request's (see _parsed_head)
        request = Request()
        request.began = self.last_active  # this read's time: no clock reading of its own
        self.queue.append(request)

    def on_url(self, url: bytes) -> None:
        request = self.queue[-1]
        request.url += url
        if len(request.url) > MAX_URL:
            raise Reject(error_reply(414, f"the URL is over {MAX_URL} bytes", "url_too_long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.queue[-1]
        if request.headers_done:
            return  # trailers of a chunked body: not forwarded
        size = request.head_size = request.head_size + len(name) + len(value) + 4
        count = request.header_count = request.header_count + 1
        if size > MAX_HEAD or count > MAX_HEADERS:
            raise Reject(
                error_reply(
                    431,
                    f"the request headers are over {MAX_HEAD} bytes or {MAX_HEADERS} lines",
                    "headers_too_large",
                )
            )
        request.add_header(name, value)

    def on_headers_complete(self) -> None:
        self.progress = True
        parser = self.parser
        request = self.queue[-1]
        request.headers_done = True
        request.method = parser.get_method().decode("ascii", "replace")
        version = parser.get_http_version()
        request.http11 = version == "1.1"
        request.keep_alive = parser.should_keep_alive()
        if self.over_limit:  # answered 503 at once (no body read, no 100 Continue)
            raise Reject(over_limit(self.state.max_connections))
        if version not in ("1.1", "1.0"):
            # llhttp reads `HTTP/0.9` and `HTTP/2.0` request lines too; neither is a
            # version this HTTP/1.1 relay (or the engine behind it) speaks.
            raise Reject(
                error_reply(
                    505, f"HTTP/{version} is not supported; send HTTP/1.1", "unsupported_version"
                )
            )
        if parser.should_upgrade():
            # feed_data raises HttpParserUpgrade once this message is complete. An h2c
            # offer without a body (curl --http2) is ignored: answered over HTTP/1.1.
            upgrade = (request.upgrade or b"").strip().lower()
            bodiless = not request.chunked and request.length in (None, b"0")
            if upgrade == b"h2c" and bodiless and request.method != "CONNECT":
                # Declined, and then checked as any request is (its Host included).
                request.h2c_offer = True
            else:
                request.error = error_reply(
                    400,
                    "the gateway does not upgrade connections (Upgrade / CONNECT); "
                    "send plain HTTP/1.1 requests",
                    "upgrade_not_supported",
                )
                request.keep_alive = False
                return
        if request.hosts > 1 or (request.http11 and request.hosts != 1):
            raise Reject(
                error_reply(
                    400, "an HTTP/1.1 request needs exactly one Host header", "invalid_request"
                )
            )
        if request.hosts and not HOST_VALUE.fullmatch(request.host):
            # RFC 9112 3.2: a Host that names no host is a 400 (it would be the engine's
            # X-Forwarded-Host).
            raise Reject(
                error_reply(400, "the Host header is not a host[:port]", "invalid_request", "Host")
            )
        core = self.state.core
        body_follows = request.chunked
        if request.length is not None:
            length = int(request.length)  # llhttp checked it is a number
            if length > core.max_body:
                raise Reject(core.too_large(length))
            body_follows = length > 0
        if body_follows and core.keys.enabled and request.method not in _LATE_AUTH:
            # Checked at the head: a client without the key never gets its body read.
            client = core.identify(request.api_key, request.authorization)
            if isinstance(client, Reply):
                raise Reject(client)
            request.client = client
            request.authorized = True
        if request.expect is not None and not request.http11:
            request.expect = None  # HTTP/1.0 knows no 1xx: the expectation is ignored
        if request.expect is not None:
            if request.expect.strip().lower() != b"100-continue":
                raise Reject(error_reply(417, "only `Expect: 100-continue` is supported", "expect"))
            if request is self.queue[0] and not self.busy:
                self._send_continue(request)

    def on_body(self, body: bytes) -> None:
        self.progress = True
        request = self.queue[-1]
        request.body += body
        self.queued_bytes += len(body)
        if len(request.body) > self.state.core.max_body:
            raise Reject(self.state.core.too_large(None))

    def on_message_complete(self) -> None:
        self.queue[-1].complete = True
        held = len(self.queue) > MAX_QUEUED or self._bytes_behind() > MAX_QUEUED_BYTES
        if held and self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _closing(self) -> bool:
        """Closed, or closing once what is written has gone (no more requests start)."""
        transport = self.transport
        return self.closed or self.shut or (transport is not None and transport.is_closing())

    def _bytes_behind(self) -> int:
        """Body bytes held by requests queued behind the one answered first (which keeps
        reading on, so a client that leaves mid-answer is noticed)."""
        queue = self.queue
        return self.queued_bytes - len(queue[0].body) if queue else 0

    # ------------------------------------------------------------ answering, in order

    def _break(self, reply: Reply) -> None:
        """The parser stopped: answer `reply` after what came before, then close."""
        self.broken = True
        self._will_linger()
        queue = self.queue
        request = queue[-1] if queue and not queue[-1].complete else Request()
        if request not in queue:
            queue.append(request)
        elif not request.headers_done and self._parsed_head():
            request.method = "HEAD"  # refused mid-head: the answer is still a head alone
        request.error = reply
        request.complete = True
        request.keep_alive = False

    def head_overdue(self, since: float) -> bool:
        """A request head still arriving that began before `since` (the sweep's test)."""
        queue = self.queue
        return bool(queue) and not queue[-1].headers_done and queue[-1].began < since

    def head_timed_out(self, seconds: float) -> None:
        """Its request head took over `seconds` (a slowloris client, nginx's
        client_header_timeout): 408, and the connection closes at once, not lingering."""
        if self.linger is None:
            self.linger = Linger(0.0, 1.0, 0)  # lingering_time 0: close at once
        self._break(
            error_reply(
                408,
                f"the request head did not arrive whole within {seconds:g} s "
                "(gateway.header_timeout); send the head at once",
                "request_timeout",
            )
        )
        self._advance()

    def _will_linger(self) -> None:
        """The parser stopped inside a request: the client may still be sending, so the
        connection will close lingering (the bytes it sends meanwhile are counted)."""
        if self.linger is None:
            gateway = self.state.core.config.gateway
            self.linger = Linger(
                gateway.lingering_time, gateway.lingering_timeout, gateway.lingering_max_bytes
            )

    def _parsed_head(self) -> bool:
        """Whether the request being parsed is a HEAD. llhttp keeps the last request's
        method until it has read this one's: a method that did not change is only this
        request's once its URL has begun."""
        method = self.parser.get_method()
        return method == b"HEAD" and (self.method_before != b"HEAD" or bool(self.queue[-1].url))

    def _send_continue(self, request: Request) -> None:
        request.continued = True
        if self.transport is not None and not self.closed:
            self.transport.write(wire.CONTINUE)

    def _advance(self) -> None:
        if self._advancing:
            return
        self._advancing = True
        try:
            while self.queue and not self.busy and not self._closing():
                request = self.queue[0]
                if not request.complete:
                    if request.expect_continue and not request.continued:
                        self._send_continue(request)
                    break
                if request.error is None and not self.admission.admit(self):
                    break  # dispatch_next() is called on a later turn of the loop
                self.busy = True
                self._handle(request)
        finally:
            self._advancing = False
        if (
            self.read_paused
            and len(self.queue) <= MAX_QUEUED // 2
            and self._bytes_behind() <= MAX_QUEUED_BYTES // 2
            and not self.closed
        ):
            self.read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def dispatch_next(self) -> None:
        """Handle the request at the head of the queue, admitted on a later turn."""
        if self.busy or self._closing() or not self.queue or not self.queue[0].complete:
            return
        self.busy = True
        self._handle(self.queue[0])

    def _handle(self, request: Request) -> None:
        if request.error is not None:
            self.reply(request.error)
            return
        try:
            self._dispatch(request)
        except Exception:
            log.exception("unexpected error handling %s", request.method)
            if self.exchange is not None:
                self.exchange.client_gone()
                self.exchange = None
            request.keep_alive = False
            if self.busy and self.queue and self.queue[0] is request:
                self.reply(internal_error())

    def _dispatch(self, request: Request) -> None:
        core = self.state.core
        target = decode_target(request.url)
        if isinstance(target, Reply):
            self.reply(target)
            return
        path, query, requote = target
        method = request.method
        if path == RELOAD_PATH and self.state.control is not None:
            control.reload(self, self.state, request, method, query)
            return
        if path in OWN_ENDPOINTS and method in ("GET", "HEAD"):
            self.reply(core.endpoint(path, query, request.api_key, request.authorization))
            return
        if path == USAGE_PATH and method in ("GET", "HEAD"):
            control.usage(self, self.state, request, query)
            return
        if path.startswith(DEPLOYMENTS_PATH):
            control.deployment(self, self.state, request, method, path)
            return
        if path.startswith("/fleet") and console.handles(path):
            console.answer(self, self.state, request, method, path, query)
            return
        request.deployment = "-"  # an API request: counted, though it reach no deployment
        client = request.client
        if not request.authorized and core.keys.enabled:
            found = core.identify(request.api_key, request.authorization)
            if isinstance(found, Reply):
                self.reply(found)
                return
            client = request.client = found
        decided = core.route(
            method, path, query, request.content_type, bytes(request.body), requote, client,
            request.lines,
        )  # fmt: skip
        if isinstance(decided, Reply):
            self.reply(decided)
            return
        request.deployment = decided.deployment
        request.style = decided.style.value
        if client is not None:
            admitted = core.admit(client, decided)
            if isinstance(admitted, Reply):
                self.reply(admitted)
                return
            request.ticket = admitted
        request.meter = Meter(decided.drop_usage)
        headers = engine_headers(request, self.peer_bytes, decided.body, self.scheme)
        self.exchange = Exchange(self, self.state, core, self.pools, request, decided, headers)
        self.exchange.start()

    # ------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.shut:
            self.transport.write(data)

    def reply(self, reply: Reply) -> None:
        """Answer the request at the head of the queue with a reply of the gateway's own."""
        request = self.queue[0]
        keep_alive = request.keep_alive and not self.state.closing
        if not keep_alive:
            connection = b"Connection: close\r\n"
        else:
            connection = b"" if request.http11 else b"Connection: keep-alive\r\n"
        request.status = reply.status
        head_only = request.method == "HEAD"
        data = wire.reply_bytes(
            reply, head_only=head_only, connection=connection, request_id=request.request_id
        )
        request.bytes_out = len(data)
        self.write(data)
        self.finish(keep_alive)

    def finish(self, keep_alive: bool) -> None:
        """The answer to the head of the queue is complete."""
        self.exchange = None
        if self.queue:
            request = self.queue.popleft()
            self.queued_bytes -= len(request.body)
            self.state.core.accounting.finished(request, self.peer_bytes)
        self.busy = False
        self.last_active = time.monotonic()
        if not keep_alive or self.state.closing:
            self.close()
            self.state.check_drained()
            return
        self._advance()

    def close(self) -> None:
        """Close once what is written has gone out; lingering, after a request refused
        before it was read whole (already lingering: it ends at one of its bounds)."""
        self.broken = True
        self.shut = True  # a lingering transport is half-closed, not is_closing()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        linger = self.linger
        if linger is None:
            transport.close()
        elif not linger.started:
            linger.start(transport, self.read_paused)
            self.read_paused = False

    def idle(self) -> bool:
        return not self.busy and not self.queue

    def _close_if_silent(self) -> None:
        """An over-the-limit connection that has not sent a request head yet: closed."""
        if not self.closed and not any(r.headers_done for r in self.queue):
            self.close()
