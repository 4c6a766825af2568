"""The load generator's client: raw asyncio HTTP/1.1 on keep-alive connections.

An aiohttp client costs several times more CPU per request and per chunk than this, and
on a small machine the load generator shares a core with the upstream, so it must stay
light: one `asyncio.Protocol` per connection, one request at a time, an incremental
response parser (Content-Length or chunked), and for SSE a byte count of token events
(`"delta":{"content":`) with one clock reading per read from the socket.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

TOKEN_MARK = b'"delta":{"content":'
DONE_MARK = b"data: [DONE]"
_CARRY = max(len(TOKEN_MARK), len(DONE_MARK)) - 1


class ProtocolError(Exception):
    pass


@dataclass
class Result:
    """One request's outcome, as the client saw it."""

    status: int = 0
    error: str | None = None
    t_send: float = 0.0
    t_first: float | None = None  # first token (streams) or first byte (otherwise)
    t_end: float = 0.0
    tokens: int = 0
    done: bool = False  # saw `data: [DONE]`
    gaps: list[float] = field(default_factory=list)
    body_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


class Client(asyncio.Protocol):
    """One keep-alive connection; `request()` sends one request and awaits the answer."""

    def __init__(self, record_gaps: bool = True) -> None:
        self.record_gaps = record_gaps
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.result: Result | None = None
        self.future: asyncio.Future[Result] | None = None
        self.lost = False
        self.record_body = False  # keep the body in `self.body` (for small JSON answers)
        self.body = bytearray()
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.in_head = True
        self.chunked = False
        self.remaining = 0  # Content-Length bytes left, or bytes left in the current chunk
        self.close_after = False
        self.carry = b""
        self.last_token = 0.0

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection closed by the server ({exc or 'EOF'})")

    def data_received(self, data: bytes) -> None:
        result = self.result
        if result is None:
            return
        now = time.perf_counter()
        self.buffer += data
        try:
            self._parse(result, now)
        except (ProtocolError, ValueError) as exc:
            self._fail(f"bad response: {exc}")
            if self.transport is not None:
                self.transport.close()

    # ------------------------------------------------------------ requests

    @property
    def usable(self) -> bool:
        """False once the server closed the connection (e.g. nginx's keepalive_requests)."""
        return self.transport is not None and not self.lost and not self.transport.is_closing()

    async def request(self, payload: bytes, timeout: float) -> Result:
        if self.transport is None or self.lost:
            return Result(error="not connected")
        loop = asyncio.get_running_loop()
        self.future = loop.create_future()
        self.result = Result()
        self._reset_parser()
        self.buffer.clear()
        self.body.clear()
        self.result.t_send = time.perf_counter()
        self.transport.write(payload)
        try:
            return await asyncio.wait_for(self.future, timeout)
        except TimeoutError:
            result = self.result
            self.result = None
            self.close()
            result.error = f"timed out after {timeout:g} s"
            result.t_end = time.perf_counter()
            return result

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: str) -> None:
        result, self.result = self.result, None
        if result is not None and self.future is not None and not self.future.done():
            result.error = error
            result.t_end = time.perf_counter()
            self.future.set_result(result)

    def _finish(self, result: Result, now: float) -> None:
        self.result = None
        result.t_end = now
        if self.close_after:
            self.close()
        if self.future is not None and not self.future.done():
            self.future.set_result(result)

    # ------------------------------------------------------------ parsing

    def _parse(self, result: Result, now: float) -> None:
        buf = self.buffer
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if not head.startswith(b"http/1.1 ") and not head.startswith(b"http/1.0 "):
                raise ProtocolError(head[:40].decode("latin-1"))
            result.status = int(head[9:12])
            self.in_head = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip()
                if name == b"content-length":
                    self.remaining = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value:
                    self.chunked = True
                elif name == b"connection" and b"close" in value:
                    self.close_after = True
            if head.startswith(b"http/1.0 "):
                self.close_after = True
        if self.chunked:
            self._parse_chunked(result, now)
        else:
            if result.t_first is None and buf:
                result.t_first = now
            take = min(len(buf), self.remaining)
            if take:
                self._body(result, bytes(buf[:take]), now)
                del buf[:take]
                self.remaining -= take
            if self.remaining == 0:
                self._finish(result, now)

    def _parse_chunked(self, result: Result, now: float) -> None:
        buf = self.buffer
        pieces: list[bytes] = []
        finished = False
        while buf:
            if self.remaining > 0:
                take = min(len(buf), self.remaining)
                pieces.append(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if self.remaining > 0:
                    break
                self.remaining = -2  # the CRLF after a chunk's data
            if self.remaining == -2:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk not followed by CRLF")
                del buf[:2]
                self.remaining = 0
                continue
            if self.remaining == -1:  # after the last chunk: trailers until an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                del buf[: end + 2]
                if end == 0:
                    finished = True
                    break
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            self.remaining = size if size else -1
        if pieces:
            self._body(result, b"".join(pieces), now)
        if finished:
            self._finish(result, now)

    def _body(self, result: Result, data: bytes, now: float) -> None:
        result.body_bytes += len(data)
        if self.record_body:
            self.body += data
        if not self.chunked:
            return
        window = self.carry + data
        tokens = window.count(TOKEN_MARK)
        if tokens:
            if result.t_first is None:
                result.t_first = now
            elif self.record_gaps:
                result.gaps.append(now - self.last_token)
            if self.record_gaps:
                result.gaps.extend([0.0] * (tokens - 1))
            self.last_token = now
            result.tokens += tokens
        if not result.done and DONE_MARK in window:
            result.done = True
        self.carry = window[-_CARRY:]


async def connect(host: str, port: int, record_gaps: bool = True) -> Client:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: Client(record_gaps), host, port)
    return protocol


def post(host: str, port: int, path: str, body: bytes, headers: bytes = b"") -> bytes:
    """The bytes of one POST with a JSON body (and `headers`, whole lines), built once and
    sent many times."""
    return (
        b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
        b"accept: */*\r\n%scontent-length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, headers, len(body), body)
    )
