"""A prototype of a protocol-level HTTP/1.1 relay, measured by `python -m bench.floor`.

Not used by the gateway. It answers one question: how close can a Python (uvloop) proxy
get to nginx's cost per request and per token when no web framework is on the proxied
path? One `asyncio.Protocol` per client connection and per pooled engine connection; the
request head is split by hand and forwarded with the body; the engine's response bytes
(head, then body, chunked or not) go to the client exactly as read, while a small
scanner follows the framing only to know where the response ends and the engine
connection can go back to the pool. Flow control: the engine connection stops reading
while the client's send buffer is full.

What it lacks for production: routing and the `model` rewrite (the gateway's own work,
about 0.06 ms per request by `python -m bench.floor`), timeouts, chunked request bodies,
HTTPS, error envelopes, pipelining, and tests.
"""

from __future__ import annotations

import asyncio
from typing import cast

_REQUEST_DROP = {b"connection", b"keep-alive", b"host", b"content-length", b"proxy-connection"}


class Framing:
    """Follows a response body's framing over raw bytes; `feed` returns how many bytes
    of `data` belong to the body (the rest would be a next response) and sets `done`."""

    def __init__(self, length: int | None, chunked: bool) -> None:
        self.length = length
        self.chunked = chunked
        self.done = length == 0 and not chunked
        self.left = 0  # bytes of chunk data (+2 for its CRLF) still to skip
        self.line = b""  # a chunk-size line split across reads
        self.trailers = False

    def feed(self, data: bytes) -> int:
        if not self.chunked:
            if self.length is None:
                return len(data)  # until the engine closes
            take = min(self.length, len(data))
            self.length -= take
            self.done = self.length == 0
            return take
        pos, end = 0, len(data)
        while pos < end and not self.done:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
                continue
            stop = data.find(b"\r\n", pos)
            if stop < 0:
                self.line += data[pos:]
                return end
            line = self.line + data[pos:stop]
            self.line = b""
            pos = stop + 2
            if self.trailers:
                self.done = not line
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self.trailers = True
            else:
                self.left = size + 2
        return pos


class Engine(asyncio.Protocol):
    """One keep-alive connection to the engine; relays one response at a time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.head = bytearray()
        self.framing: Framing | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        if client is not None:
            self.client = None
            framing = self.framing
            if framing is not None and not framing.chunked and framing.length is None:
                client.finish(close=True)  # close-delimited body: the end is the close
            else:
                client.abort()

    def send(self, client: Client, data: bytes) -> None:
        self.client = client
        self.head.clear()
        self.framing = None
        self.keep_alive = True
        if self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        if self.framing is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            framing = self.framing = self._framing(bytes(self.head[:end]))
            rest = len(self.head) - end - 4
            taken = framing.feed(bytes(self.head[end + 4 :])) if rest else 0
            client.write(bytes(self.head[: end + 4 + taken]))  # head and body in one send
        else:
            framing = self.framing
            taken = framing.feed(data)
            if taken:
                client.write(data if taken == len(data) else data[:taken])
        if framing.done:
            self.client = None
            self.relay.release(self)
            client.finish(close=False)

    def _framing(self, head: bytes) -> Framing:
        length: int | None = None
        chunked = False
        status = head[9:12]
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
        if status in (b"204", b"304") or status.startswith(b"1"):
            length = 0
        if length is None and not chunked:
            self.keep_alive = False
        return Framing(length if not chunked else None, chunked)

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


class Client(asyncio.Protocol):
    """One client connection: parse a request, hand it to an engine connection."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.engine: Engine | None = None
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        engine = self.engine
        if engine is not None and engine.transport is not None:
            engine.client = None
            engine.transport.close()  # the engine aborts the request

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end])
        lines = head.split(b"\r\n")
        length = 0
        kept = []
        for line in lines[1:]:
            name = line.split(b":", 1)[0].strip().lower()
            if name == b"content-length":
                length = int(line.split(b":", 1)[1])
            if name not in _REQUEST_DROP:
                kept.append(line)
        if len(buf) < end + 4 + length:
            return
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        self.busy = True
        out = b"\r\n".join(
            [lines[0], self.relay.host_line, *kept, b"content-length: %d" % length, b"", b""]
        )
        self.relay.forward(self, out + body)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def finish(self, close: bool) -> None:
        self.engine = None
        self.busy = False
        if close and self.transport is not None:
            self.transport.close()
        elif self.buffer:
            self.next_request()

    def abort(self) -> None:
        self.engine = None
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.engine is not None:
            self.engine.pause()

    def resume_writing(self) -> None:
        if self.engine is not None:
            self.engine.resume()


class Relay:
    """The shared state: where the engine is, and its idle keep-alive connections."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.host_line = f"host: {host}:{port}".encode()
        self.idle: list[Engine] = []

    def forward(self, client: Client, data: bytes) -> None:
        while self.idle:
            engine = self.idle.pop()
            if not engine.closed:
                client.engine = engine
                engine.send(client, data)
                return
        asyncio.get_running_loop().create_task(self._connect_and_send(client, data))

    async def _connect_and_send(self, client: Client, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, engine = await loop.create_connection(lambda: Engine(self), self.host, self.port)
        except OSError:
            client.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            client.finish(close=True)
            return
        client.engine = engine
        engine.send(client, data)

    def release(self, engine: Engine) -> None:
        if engine.keep_alive and not engine.closed:
            self.idle.append(engine)
        elif engine.transport is not None:
            engine.transport.close()


async def serve(port: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay("127.0.0.1", upstream)
    await loop.create_server(lambda: Client(relay), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()  # until the benchmark stops the process
