"""A lean vLLM look-alike for the benchmark: raw asyncio (uvloop) HTTP/1.1, keep-alive.

    python -m bench.upstream --port P [--host 127.0.0.1]

`POST /v1/chat/completions` answers like `vllm serve`: a JSON completion, or with
`"stream": true` SSE in vLLM's format (`data: {chunk}\\n\\n` ..., `data: [DONE]`) over
chunked transfer encoding, as uvicorn sends it. `max_tokens` sets how many tokens; the
body field `bench_token_delay` (seconds, default 0) sets the time between tokens.

Streams that share a token delay are driven by one ticker, the way vLLM's scheduler emits
one token per step for every running sequence: one timer per tick, not one per stream,
so the upstream stays cheap at thousands of streams. The first token is sent at once
(prefill is free here), so time to first token through a proxy is the proxy's own cost.
Chunk bytes are built once and reused. `GET /health`, `GET /v1/models` and
`GET /bench/stats` (`?reset=1`) are there too; any `model` is accepted.

The server runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any, cast

MODEL = "bench/model"
CREATED = 1_700_000_000
DEFAULT_TOKENS = 16
MAX_TOKENS = 100_000
_HEAD = {"id": "chatcmpl-bench", "created": CREATED, "model": MODEL}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(chunk: dict[str, Any]) -> bytes:
    return _chunked(b"data: " + _dumps(chunk) + b"\n\n")


def _token_text(index: int) -> str:
    return f"tok{index}" if index == 0 else f" tok{index}"


def _response(status: str, ctype: str, body: bytes, close: bool = False) -> bytes:
    conn = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%sserver: uvicorn\r\n\r\n%s"
        % (status.encode(), ctype.encode(), len(body), conn, body)
    )


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\nserver: uvicorn\r\n\r\n"
)
ROLE_EVENT = _event(
    {
        **_HEAD,
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
)
DONE_EVENTS = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Chunks:
    """Every byte string a response needs, built once and reused."""

    def __init__(self) -> None:
        self._tokens: list[bytes] = []
        self._finals: dict[tuple[int, bool], bytes] = {}
        self._bodies: dict[int, bytes] = {}

    def token(self, index: int) -> bytes:
        while len(self._tokens) <= index:
            i = len(self._tokens)
            self._tokens.append(
                _event(
                    {
                        **_HEAD,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": _token_text(i)},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            )
        return self._tokens[index]

    def final(self, count: int, usage: bool) -> bytes:
        key = (count, usage)
        if key not in self._finals:
            last = {
                **_HEAD,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
            }
            data = _event(last)
            if usage:
                counts = {"prompt_tokens": 8, "completion_tokens": count}
                counts["total_tokens"] = 8 + count
                data += _event(
                    {**_HEAD, "object": "chat.completion.chunk", "choices": [], "usage": counts}
                )
            self._finals[key] = data + DONE_EVENTS
        return self._finals[key]

    def body(self, count: int) -> bytes:
        if count not in self._bodies:
            text = "".join(_token_text(i) for i in range(count))
            message = {"role": "assistant", "content": text, "tool_calls": []}
            completion = {
                **_HEAD,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
                ],
                "usage": {
                    "prompt_tokens": 8,
                    "completion_tokens": count,
                    "total_tokens": 8 + count,
                },
            }
            self._bodies[count] = _response("200 OK", "application/json", _dumps(completion))
        return self._bodies[count]


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.streams = 0
        self.active = 0
        self.peak_active = 0
        self.tokens = 0
        self.connections = 0  # accepted (a proxy that keeps too few alive opens many)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Stream:
    def __init__(self, conn: Connection, count: int, usage: bool) -> None:
        self.conn = conn
        self.count = count
        self.usage = usage
        self.sent = 0


class Ticker:
    """Sends the next token of every stream that shares one token delay, once per tick."""

    def __init__(self, server: Server, delay: float) -> None:
        self.server = server
        self.delay = delay
        self.streams: dict[Stream, None] = {}  # insertion-ordered set
        self.handle: asyncio.TimerHandle | None = None
        self.next_at = 0.0

    def add(self, stream: Stream) -> None:
        self.streams[stream] = None
        if self.handle is None:
            loop = self.server.loop
            self.next_at = loop.time() + self.delay
            self.handle = loop.call_at(self.next_at, self.tick)

    def remove(self, stream: Stream) -> None:
        self.streams.pop(stream, None)

    def tick(self) -> None:
        self.handle = None
        for stream in list(self.streams):
            if not self.server.send_token(stream):
                self.streams.pop(stream, None)
        if self.streams:
            loop = self.server.loop
            self.next_at = max(self.next_at + self.delay, loop.time())
            self.handle = loop.call_at(self.next_at, self.tick)


class Server:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks = Chunks()
        self.stats = Stats()
        self.tickers: dict[float, Ticker] = {}

    def start_stream(self, conn: Connection, count: int, delay: float, usage: bool) -> None:
        stream = Stream(conn, count, usage)
        conn.stream = stream
        self.stats.streams += 1
        self.stats.active += 1
        self.stats.peak_active = max(self.stats.peak_active, self.stats.active)
        conn.write(STREAM_HEAD + ROLE_EVENT)
        if delay <= 0:
            while self.send_token(stream):
                pass
            return
        if self.send_token(stream):
            ticker = self.tickers.get(delay)
            if ticker is None:
                ticker = self.tickers[delay] = Ticker(self, delay)
            ticker.add(stream)

    def send_token(self, stream: Stream) -> bool:
        """Send one token (and the end after the last); False when the stream is over."""
        conn = stream.conn
        if conn.closed:
            return False
        data = self.chunks.token(stream.sent)
        stream.sent += 1
        self.stats.tokens += 1
        if stream.sent >= stream.count:
            data += self.chunks.final(stream.count, stream.usage)
            conn.write(data)
            self.end_stream(stream)
            return False
        conn.write(data)
        return True

    def end_stream(self, stream: Stream) -> None:
        self.stats.active -= 1
        conn = stream.conn
        conn.stream = None
        if conn.close_after:
            conn.close()
        else:
            conn.process()  # a request that arrived during the stream

    def drop_stream(self, stream: Stream) -> None:
        self.stats.active -= 1
        for ticker in self.tickers.values():
            ticker.remove(stream)


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.stream: Stream | None = None
        self.closed = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None:
            self.server.drop_stream(self.stream)
            self.stream = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.stream is None:
            self.process()

    def process(self) -> None:
        """Answer every complete request in the buffer (one at a time while streaming)."""
        while self.stream is None and not self.closed:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            lines = head.split("\r\n")
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding":
                    self.write(_response("411 Length Required", "text/plain", b"", True))
                    self.close()
                    return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            parts = lines[0].split(" ")
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            self.close_after = close
            self.handle(method, target, body)
            if close and self.stream is None:
                self.close()

    def handle(self, method: str, target: str, body: bytes) -> None:
        server = self.server
        path, _, query = target.partition("?")
        if method == "POST" and path == "/v1/chat/completions":
            server.stats.requests += 1
            try:
                request = json.loads(body)
            except ValueError:
                request = None
            if not isinstance(request, dict):
                error = {"error": {"message": "bad JSON", "type": "BadRequestError", "code": 400}}
                self.write(_response("400 Bad Request", "application/json", _dumps(error)))
                return
            count = request.get("max_tokens") or DEFAULT_TOKENS
            count = max(1, min(int(count), MAX_TOKENS))
            if request.get("stream"):
                delay = float(request.get("bench_token_delay") or 0.0)
                options = request.get("stream_options") or {}
                usage = bool(isinstance(options, dict) and options.get("include_usage"))
                server.start_stream(self, count, delay, usage)
            else:
                self.write(server.chunks.body(count))
        elif method == "GET" and path in ("/health", "/ping"):
            self.write(_response("200 OK", "application/json", b""))
        elif method == "GET" and path == "/v1/models":
            card = {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "vllm"}
            listing = {"object": "list", "data": [card]}
            self.write(_response("200 OK", "application/json", _dumps(listing)))
        elif method == "GET" and path == "/bench/stats":
            self.write(_response("200 OK", "application/json", _dumps(server.stats.as_dict())))
            if "reset=1" in query:
                active = server.stats.active
                server.stats = Stats()
                server.stats.active = server.stats.peak_active = active
        else:
            error = {"error": {"message": "Not Found", "type": "Not Found", "code": 404}}
            self.write(_response("404 Not Found", "application/json", _dumps(error)))


async def serve(host: str, port: int | None, uds: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = Server(loop)
    if uds is not None:  # as vLLM's --uds: a Unix socket, no TCP port
        listener = await loop.create_unix_server(lambda: Connection(server), uds, backlog=4096)
        print(f"bench upstream: serving on unix:{uds}", flush=True)
    else:
        listener = await loop.create_server(
            lambda: Connection(server), host, port, reuse_address=True, backlog=4096
        )
        print(f"bench upstream: serving on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--uds", default=None, help="listen on this Unix socket instead")
    # Started by `fleet up` (a local engine), it moves itself to the upstream's cores.
    parser.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. 0,1")
    # Unknown flags (the --served-model-name the fleet adds) are ignored, as vLLM's own.
    args, _ = parser.parse_known_args(argv)
    if args.port is None and args.uds is None:
        parser.error("give --port or --uds")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.uds))
    else:
        uvloop.run(serve(args.host, args.port, args.uds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
