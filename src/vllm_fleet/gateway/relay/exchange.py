"""One proxied request: pick a replica, send, relay the answer's bytes to the client.

The exchange is the engine connection's `Sink`, and talks back to its client connection
through `Downstream` (write, reply, finish), the mirror of `Sink`. Response bytes go to
the client as they arrive, coalesced per read of the engine's socket into one write; a
chunked answer is re-framed chunk by chunk, nothing else is looked at.

Failover, before the first byte only: a replica that refuses the connection, times out
connecting, or closes or resets it before its answer's head is complete (nothing of the
answer has gone to the client yet) is ejected from the rotation (until a health check
passes; registry.py) and the request goes to the next replica `core.pick` gives, each at
most once; the body is sent again from memory (a request is relayed only once its whole
body is in, at most gateway.max_body_mb). When none is left: 503 if every replica tried
refused or timed out, else 502. A pooled connection found closed before any byte is
retried once on a fresh connection to the same replica first (the engine's idle close,
not a failure). Never after the head went to the client: an answer broken mid-SSE ends
with an error event and [DONE]; broken mid-body, the client's connection is closed. A
malformed head is a 502 (a broken engine, not a missing one).
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from typing import Protocol

from vllm_fleet.gateway.core import Core, Forward, Queued
from vllm_fleet.gateway.errors import Reply, sse_error_event
from vllm_fleet.gateway.relay import wire
from vllm_fleet.gateway.relay.request import Request
from vllm_fleet.gateway.relay.state import ServerState
from vllm_fleet.gateway.relay.upstream import EngineConnection, Framing, Pools
from vllm_fleet.gateway.usage import USAGE_MARK
from vllm_fleet.registry import Upstream

log = logging.getLogger(__name__)

# Connect errors that are the gateway's own lack of resources (open files, buffers), not
# the engine's fault: the request still goes on to another replica, but none is ejected.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Downstream(Protocol):
    """Where an exchange delivers its answer (the client connection)."""

    @property
    def write_paused(self) -> bool:
        """The client's transport asked for no more writes for now."""
        ...

    def write(self, data: bytes) -> None: ...
    def reply(self, reply: Reply) -> None:
        """Answer with a reply of the gateway's own, instead of the engine's."""
        ...

    def finish(self, keep_alive: bool) -> None:
        """The answer is complete; the connection goes on (or closes)."""
        ...


@functools.lru_cache(maxsize=256)
def upstream_headers(name: str) -> bytes:
    """The headers the relay adds to every answer from upstream `name`, and the blank
    line that ends the head."""
    return wire.RELAY_HEADERS + b"X-Fleet-Upstream: %s\r\n\r\n" % name.encode()


class Exchange:
    __slots__ = (
        "_out",
        "chunked",
        "client",
        "close_after",
        "core",
        "done",
        "engine",
        "failed_from",
        "failures",
        "forward",
        "headers",
        "is_sse",
        "meter",
        "pools",
        "queued",
        "relay_headers",
        "request",
        "responded",
        "retried",
        "state",
        "tried",
        "unanswered",
        "upstream",
        "waited",
    )

    def __init__(
        self,
        client: Downstream,
        state: ServerState,
        core: Core,
        pools: Pools,
        request: Request,
        forward: Forward,
        headers: bytes,
    ) -> None:
        self.client = client
        self.state = state
        self.core = core  # the one this request was decided with
        self.pools = pools
        self.request = request
        self.forward = forward
        self.meter = request.meter  # reads the answer's usage (accounting.py)
        self.headers = headers  # the request's header lines for the engine, less Host
        self.upstream: Upstream | None = None
        self.engine: EngineConnection | None = None
        self.tried: set[Upstream] = set()  # the replicas this request was sent to
        self.failures: tuple[str, ...] = ()  # why each one tried failed, before any answer
        self.unanswered = False  # one of them took the connection and closed it unanswered
        self.failed_from: Upstream | None = None  # the replica the next try fails over from
        self.retried = False
        self.responded = False  # the response head went to the client
        self.chunked = False  # re-framing the body as chunked to the client
        self.close_after = False
        self.is_sse = False
        self.done = False
        self._out: list[bytes] = []
        self.relay_headers = b""
        self.queued: Queued | None = None  # waiting for its on-demand deployment to load
        self.waited = False  # it waited once already

    # ------------------------------------------------------------ sending

    def start(self) -> None:
        core = self.core
        dep_id = self.forward.deployment
        upstream = core.pick(dep_id, self.tried, self.forward.hint)
        if upstream is None:
            demand = core.demand
            # Only a POST (an inference) loads an engine: a monitor's GET of
            # /{id}/health or /{id}/v1/models must not keep models loaded.
            post = self.request.method == "POST"
            if demand is not None and post and not self.failures and not self.waited:
                queued = demand.enqueue(core.engines_of(dep_id), self._resumed)
                if isinstance(queued, Reply):
                    reply = queued
                elif queued is not None:
                    self.queued = queued
                    self.waited = True
                    return
                else:
                    reply = core.unavailable(dep_id)
            elif not self.failures:
                reply = core.unavailable(dep_id)
            elif self.unanswered:
                reply = core.unanswered(dep_id, self.failures)
            else:
                reply = core.unreachable(dep_id, self.failures)
            self.done = True
            core.counted(dep_id, self.forward.style, reply.status)
            self.client.reply(reply)
            return
        if self.failed_from is not None:
            core.failed_over(self.failed_from)
            self.failed_from = None
        self.tried.add(upstream)
        self.upstream = upstream
        self.relay_headers = upstream_headers(upstream.name)
        self.retried = False
        upstream.outstanding += 1
        if dep_id in upstream.adapters:  # an adapter's request: drained before it unloads
            upstream.adapter_inflight[dep_id] = upstream.adapter_inflight.get(dep_id, 0) + 1
        if self.request.method == "POST":
            upstream.served += 1  # a use of the engine (idle unload reads it)
        pool = self.pools.get(upstream.url)
        conn = pool.take_idle()
        if conn is not None:
            self._send(conn)
        else:
            self._connect_later()

    def _resumed(self, reply: Reply | None) -> None:
        """Its on-demand deployment is loaded (None: pick a replica now), or it waited
        in vain (the 503 to answer)."""
        self.queued = None
        if self.done:
            return
        if reply is None:
            self.start()
            return
        self.done = True
        self.core.counted(self.forward.deployment, self.forward.style, reply.status)
        self.client.reply(reply)

    def _connect_later(self) -> None:
        assert self.upstream is not None
        self.pools.get(self.upstream.url).connect(self._connected)

    def _connected(self, result: EngineConnection | BaseException) -> None:
        if isinstance(result, EngineConnection):
            if self.done:  # the client left while we connected
                if result.transport is not None:
                    result.transport.close()
                return
            self._send(result)
            return
        if self.done:
            return
        if not isinstance(result, OSError | TimeoutError):
            log.error("unexpected error connecting to an engine", exc_info=result)
        local = isinstance(result, OSError) and result.errno in _LOCAL_ERRNOS
        why = str(result) or "no connection within gateway.connect_timeout"
        self._fail_over(why, took_it=False, eject=not local)

    def _send(self, conn: EngineConnection) -> None:
        upstream = self.upstream
        assert upstream is not None
        pool = conn.pool
        self.engine = conn
        method = self.request.method
        head = b"%s %s%s HTTP/1.1\r\nHost: %s\r\n" % (
            method.encode(),
            pool.base_path.encode(),
            self.forward.path_qs.encode("latin-1"),
            pool.host_header,
        )
        conn.send(self, head + self.headers + self.forward.body, method == "HEAD")
        if self.client.write_paused:
            conn.pause()

    def _fail_over(self, reason: str, took_it: bool, eject: bool = True) -> None:
        """The replica failed before any byte of its answer (`took_it`: after it took the
        connection): out of the rotation, and the request goes to the next one."""
        upstream = self.upstream
        assert upstream is not None
        name = upstream.name
        if not eject:
            log.warning("no connection to engine %s: %s", name, reason)
        elif upstream.eject(reason):
            log.warning(
                "engine %s failed before answering (%s): out of the rotation until a health "
                "check passes",
                name,
                reason,
            )
        else:
            log.info("engine %s failed before answering again: %s", name, reason)
        self.failures += (f"{name}: {reason}",)
        self.unanswered = self.unanswered or took_it
        self.failed_from = upstream
        self._release()
        self.engine = None
        self.start()

    def _release(self) -> None:
        """Give back the upstream's outstanding count (the in-flight metric)."""
        upstream = self.upstream
        if upstream is not None:
            upstream.outstanding -= 1
            inflight = upstream.adapter_inflight
            if inflight and self.forward.deployment in inflight:
                inflight[self.forward.deployment] -= 1
            self.upstream = None

    # ------------------------------------------------------------ Sink (engine side)

    def on_head(self, status: int, lines: list[bytes], framing: Framing) -> None:
        request = self.request
        self.is_sse = framing.sse
        request.status = status
        request.responded = True
        request.first_byte = now = time.monotonic()
        meter = self.meter
        if meter is not None:
            meter.start(framing.sse, status == 200)
            if framing.length is not None and not framing.chunked:
                meter.drop_usage = False  # a Content-Length body: relayed byte for byte
        wire.one_request_id(lines, request.request_id)
        if request.ticket is not None:
            lines.append(request.ticket.headers(now))
        keep_alive = request.keep_alive and not self.state.closing
        if request.method == "HEAD" or status in (204, 304):
            if framing.length is not None:
                lines.append(b"Content-Length: %d\r\n" % framing.length)
        elif framing.length is not None and not framing.chunked:
            lines.append(b"Content-Length: %d\r\n" % framing.length)
        elif request.http11:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self.chunked = True
        else:
            keep_alive = False  # HTTP/1.0 client: the body ends with the connection
        self.close_after = not keep_alive
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif not request.http11:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(self.relay_headers)
        self._out.append(wire.status_line(status) + b"".join(lines))
        self.responded = True
        self.core.counted(self.forward.deployment, self.forward.style, status)

    def on_body(self, data: bytes) -> None:
        if not self.request.first_body:
            self.request.first_body = time.monotonic()
        meter = self.meter
        # Most reads of a stream are whole events without usage: passed on, unlooked at.
        if meter is not None and not (
            meter.sse and not meter.held and USAGE_MARK not in data and data.endswith(b"\n\n")
        ):
            data = meter.feed(data)
            if not data:
                return  # held back (an unfinished event), or the usage event left out
        self._add(data)

    def _add(self, data: bytes) -> None:
        if self.chunked:
            self._out.append(b"%x\r\n" % len(data))
            self._out.append(data)
            self._out.append(b"\r\n")
        else:
            self._out.append(data)

    def on_flush(self) -> None:
        if self._out:
            out = self._out
            self._out = []
            data = b"".join(out) if len(out) > 1 else out[0]
            self.request.bytes_out += len(data)
            self.client.write(data)

    def on_end(self) -> None:
        if self.done:
            return
        self.done = True
        self.engine = None
        self._release()
        self._end_meter()
        if self.chunked:
            self.client.write(wire.LAST_CHUNK)
        self.client.finish(keep_alive=not self.close_after)

    def _end_meter(self) -> None:
        """Pass on what the meter still held back (the stream's last, unfinished event)."""
        meter = self.meter
        if meter is not None and self.responded:
            rest = meter.end()
            if rest:
                self._add(rest)
                self.on_flush()

    def on_fail(self, exc: BaseException | None, retry: bool) -> None:
        if self.done:
            return
        self.engine = None
        upstream = self.upstream
        name = upstream.name if upstream is not None else "?"
        if not self.responded:
            if retry and not self.retried:
                # A pooled connection the engine had closed: once more on a fresh one.
                self.retried = True
                log.debug("engine %s closed a pooled connection; retrying fresh", name)
                self._connect_later()
                return
            if isinstance(exc, ConnectionError):
                # Taken and dropped (closed, reset) before the client got anything.
                # Said in words (the 502 quotes it), never as Python's class name.
                how = "reset" if isinstance(exc, ConnectionResetError) else "closed"
                self._fail_over(f"{how} the connection before answering", took_it=True)
                return
            self.done = True
            core = self.core
            reply = core.upstream_failed(upstream, exc or ConnectionError()) if upstream else None
            self._release()
            if reply is not None:
                core.counted(self.forward.deployment, self.forward.style, reply.status)
                self.client.reply(reply)
            return
        self.done = True
        self._release()
        self._end_meter()
        log.warning("engine %s broke off mid-response: %s", name, exc)
        if self.is_sse and (self.chunked or self.close_after):
            event = sse_error_event(
                f"engine {name} broke off the stream: {exc or 'the connection broke'}",
                "upstream_disconnected",
            )
            if self.chunked:
                self.client.write(wire.chunk(event) + wire.LAST_CHUNK)
                self.client.finish(keep_alive=not self.close_after)
            else:  # a body delimited by the close (HTTP/1.0 client)
                self.client.write(event)
                self.client.finish(keep_alive=False)
        else:
            # The status line is gone already; dropping the connection is the only
            # honest signal left for a non-streamed body.
            self.client.finish(keep_alive=False)

    # ------------------------------------------------------------ client side

    def client_gone(self) -> None:
        """The client disconnected: drop the engine's connection (vLLM aborts)."""
        if self.done:
            return
        self.done = True
        if self.queued is not None:
            self.queued.cancel()
            self.queued = None
        if self.engine is not None:
            self.engine.abort()
            self.engine = None
        self._release()

    def pause(self) -> None:
        if self.engine is not None:
            self.engine.pause()

    def resume(self) -> None:
        if self.engine is not None:
            self.engine.resume()
