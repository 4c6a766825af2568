"""A prototype of a lean upstream client for the gateway, measured by `python -m bench.floor`.

Not used by the gateway. It shows what replacing aiohttp's ClientSession with one raw
asyncio protocol per pooled keep-alive connection saves: the request is written as one
bytes object, the response head is split by hand, and the body comes back as the bytes
each read from the socket held (de-chunked), with no StreamReader, timers or payload
objects per request. What it lacks for production: timeouts, HTTPS, a bounded pool,
HTTP/1.0 and `Expect` handling, and the tests the gateway's client has.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast


class UpConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        if self.closed:
            raise ConnectionError("upstream closed")
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter
        self.waiter = None


class Pool:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[UpConn]] = {}

    async def acquire(self, host: str, port: int) -> UpConn:
        idle = self.idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(UpConn, host, port)
        return conn

    def release(self, host: str, port: int, conn: UpConn) -> None:
        if not conn.closed and not conn.buf:
            self.idle.setdefault((host, port), []).append(conn)


class Response:
    """Status, headers, and an async iterator of body payload bytes (de-chunked)."""

    def __init__(self, pool: Pool, key: tuple[str, int], conn: UpConn) -> None:
        self.pool, self.key, self.conn = pool, key, conn
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.done = False

    async def start(self) -> None:
        conn = self.conn
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            await conn.wait()
        head = bytes(conn.buf[:end]).decode("latin-1")
        del conn.buf[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            value = value.strip()
            low = name.lower()
            if low == "content-length":
                self.length = int(value)
            elif low == "transfer-encoding":
                self.chunked = "chunked" in value.lower()
            elif low == "connection" and value.lower() == "close":
                self.keep_alive = False
            self.headers.append((name, value))
        if not self.chunked and self.length is None:
            self.keep_alive = False

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self.conn
        buf = conn.buf
        if not self.chunked:
            left = self.length
            while left is None or left > 0:
                if not buf:
                    if conn.closed:
                        if left is None:
                            break
                        raise ConnectionError("upstream closed mid-body")
                    await conn.wait()
                    continue
                take = len(buf) if left is None else min(left, len(buf))
                data = bytes(buf[:take])
                del buf[:take]
                if left is not None:
                    left -= take
                yield data
        else:
            remaining = 0  # bytes of chunk data left; -2: CRLF after data
            while True:
                out: list[bytes] = []
                finished = False
                while buf:
                    if remaining > 0:
                        take = min(remaining, len(buf))
                        out.append(bytes(buf[:take]))
                        del buf[:take]
                        remaining -= take
                        if remaining == 0:
                            remaining = -2
                        continue
                    if remaining == -2:
                        if len(buf) < 2:
                            break
                        del buf[:2]
                        remaining = 0
                        continue
                    if remaining == -1:  # trailers
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
                    remaining = size if size else -1
                if out:
                    yield b"".join(out)
                if finished:
                    break
                if conn.closed:
                    raise ConnectionError("upstream closed mid-stream")
                await conn.wait()
        self.done = True

    def release(self) -> None:
        if self.done and self.keep_alive:
            self.pool.release(*self.key, self.conn)
        elif self.conn.transport is not None:
            self.conn.transport.close()


async def request(
    pool: Pool,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> Response:
    key = (host, port)
    conn = await pool.acquire(host, port)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    if conn.transport is None:
        raise ConnectionError("upstream connection not open")
    conn.transport.write(data)
    response = Response(pool, key, conn)
    await response.start()
    return response
