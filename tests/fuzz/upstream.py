"""The campaign's engine: a threaded HTTP/1.1 server that parses what the gateway sends it
with h11 (not the gateway's llhttp) and records every request it receives.

Each request is recorded whole, once its body has ended, before it is answered: its
`X-Fuzz-Id` (the generator's name for it), method, target, header lines and body. The
answer's shape is the request's `X-Fuzz-Answer` (ANSWERS); every answer names the request
it answers (`X-Fuzz-Got`), so a client can tell that the k-th answer it reads belongs to
the k-th request it sent. Bytes from the gateway that h11 refuses, or header lines a strict
reading of RFC 9110 refuses, are problems: the gateway made an invalid request.

`GET <base>/health` without `X-Forwarded-For` is the fleet's probe of a remote endpoint
(engines/remote.py), answered and counted apart: the gateway adds `X-Forwarded-For` to
every request it relays.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import threading
from dataclasses import dataclass, field

import h11

# Header names are tokens; values are visible characters, obs-text, spaces and tabs
# (RFC 9110 5.1, 5.5); a target is visible ASCII (RFC 9112 3.2).
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
TARGET = re.compile(rb"[\x21-\x7e]+")

# What the engine answers, by the request's `X-Fuzz-Answer`.
ANSWERS = ("length", "chunked", "sse", "eof", "close", "204", "103", "bad", "cut", "ssecut")
# Answers after which the engine closes its connection.
CLOSING = frozenset({"eof", "close", "bad", "cut", "ssecut"})


@dataclass
class Seen:
    """One request as the engine received it."""

    fuzz_id: str | None
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    answer: str = "length"
    problems: list[str] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def probe(self) -> bool:
        return (
            self.method == "GET"
            and self.target.endswith(b"/health")
            and not self.header(b"x-forwarded-for")
        )


def answer_bytes(seen: Seen) -> bytes:
    """The engine's answer to `seen`, as its `X-Fuzz-Answer` asks."""
    got = (seen.fuzz_id or "-").encode()
    mark = b"X-Fuzz-Got: %s\r\nX-Fuzz-Len: %d\r\n" % (got, len(seen.body))
    body = b'{"got":"%s","len":%d}' % (got, len(seen.body))
    mode = seen.answer
    if seen.method == "HEAD" and mode not in ("bad", "204"):
        # A head alone, announcing the body a GET would get.
        return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (mark, len(body))
    if mode == "chunked":
        half = len(body) // 2
        return (
            b"HTTP/1.1 200 OK\r\n%sContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (mark, half, body[:half], len(body) - half, body[half:])
        )
    if mode in ("sse", "ssecut"):
        event = b"data: " + body + b"\n\n"
        end = b"" if mode == "ssecut" else b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\n%sContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%s" % (mark, len(event), event, end)
        )
    if mode == "eof":
        return b"HTTP/1.1 200 OK\r\n%sConnection: close\r\n\r\n%s" % (mark, body)
    if mode == "204":
        return b"HTTP/1.1 204 No Content\r\n%s\r\n" % mark
    if mode == "bad":
        return b"HTTP/1.1 2x0 Nonsense\r\n%s\r\n" % mark
    if mode == "cut":
        return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
            mark,
            len(body) + 100,
            body,
        )
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" if mode == "103" else b""
    close = b"Connection: close\r\n" if mode == "close" else b""
    return (
        b"%sHTTP/1.1 200 OK\r\n%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (
            interim,
            mark,
            close,
            len(body),
            body,
        )
    )


def strict_problems(request: h11.Request) -> list[str]:
    """What a strict reading of RFC 9110/9112 refuses in a request h11 accepted."""
    problems = []
    if not TARGET.fullmatch(request.target):
        problems.append(f"target with bytes outside visible ASCII: {request.target[:200]!r}")
    names = [name for name, _ in request.headers]
    for name, value in request.headers:
        if not TOKEN.fullmatch(name):
            problems.append(f"header name that is not a token: {name[:100]!r}")
        if not FIELD_VALUE.fullmatch(value):
            problems.append(f"header {name[:60]!r} with control bytes: {value[:200]!r}")
    for name in (b"host", b"content-length"):
        if names.count(name) > 1:
            problems.append(f"{name.decode()} sent {names.count(name)} times")
    if b"transfer-encoding" in names:
        problems.append("Transfer-Encoding sent to the engine (the relay frames by length)")
    if names.count(b"host") != 1:
        problems.append("no Host header")
    return problems


class RecordingEngine:
    """`RecordingEngine().port`; every request lands on `records` (probes on `probes`)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.records: queue.SimpleQueue[Seen] = queue.SimpleQueue()
        self.problems: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.probes = 0
        self.connections = 0
        self._closing = False
        threading.Thread(target=self._accept, name="fuzz-engine", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while not self._closing:
                conn, _ = self.listener.accept()
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 18)
        raw = bytearray()  # what this connection sent, for the problem report
        current: Seen | None = None
        body = bytearray()
        with sock, contextlib.suppress(OSError):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    tail = bytes(raw[-600:])
                    self.problems.put(f"the gateway sent the engine invalid HTTP ({exc}): {tail!r}")
                    return
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    raw += data
                    del raw[:-4096]
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    headers = [(n, v) for n, v in event.headers.raw_items()]
                    lower = [(n.lower(), v) for n, v in headers]
                    ids = [v for n, v in lower if n == b"x-fuzz-id"]
                    answers = [v for n, v in lower if n == b"x-fuzz-answer"]
                    answer = answers[0].decode("latin-1") if answers else "length"
                    current = Seen(
                        fuzz_id=ids[0].decode("latin-1") if len(ids) == 1 else None,
                        method=event.method.decode("latin-1"),
                        target=event.target,
                        headers=lower,
                        answer=answer if answer in ANSWERS else "length",
                        problems=strict_problems(event),
                    )
                    if len(ids) > 1:
                        current.problems.append(f"X-Fuzz-Id sent {len(ids)} times")
                    body = bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and current is not None:
                    current.body = bytes(body)
                    seen, current = current, None
                    if seen.probe:
                        self.probes += 1
                        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    else:
                        self.records.put(seen)
                        sock.sendall(answer_bytes(seen))
                        if seen.answer in CLOSING:
                            return
                    # h11 must see an answer to go on to the next request.
                    conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                    conn.send(h11.EndOfMessage())
                    try:
                        conn.start_next_cycle()
                    except h11.LocalProtocolError:
                        return
