"""Hostile clients and odd engines, over raw sockets on 127.0.0.1.

Request smuggling, header injection towards the engine, limits, the response path's
framing and engine-connection reuse, and path tricks. `RawEngine` is an engine of our own
that records every request it receives (target, header lines, body, which connection) and
answers with the framing the last path segment names (ANSWERS). After each test a normal
request must still succeed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx2 as httpx
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.testing.harness import FakeEngine

MODEL = "org/hostile"


@dataclass
class Seen:
    """One request as the engine received it."""

    conn: int  # which engine connection (1, 2, ...) it came on
    method: str = ""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


# What the raw engine answers, by the last segment of the path (otherwise 200, with the
# number of requests seen so far as the body).
ANSWERS = {
    b"close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose",
    b"eof": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread to the close",
    b"204": b"HTTP/1.1 204 No Content\r\nX-Mode: 204\r\n\r\n",
    b"304": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    b"103": b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
    b"head": b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n",
    # A 204 and then bytes nobody asked for, whole or cut short: never the next answer.
    b"204junk": b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad",
    b"204partial": b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
    # Broken framing from the engine: refused (502), or cut short (then closed).
    b"clte": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"twocl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"big": b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"x" * 4_000_000,
    b"hop": b"HTTP/1.1 200 OK\r\nConnection: Foo\r\nFoo: engine\r\nContent-Length: 2\r\n\r\nok",
}
CLOSING = {b"close", b"eof", b"short"}


class RawEngine:
    """A threaded HTTP/1.1 engine (llhttp-parsed) that records what it receives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[Seen] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        number = 0
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                number += 1
                threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        done: list[Seen] = []

        class Callbacks:
            def on_message_begin(self) -> None:
                done.append(Seen(number))

            def on_url(self, url: bytes) -> None:
                done[-1].target += url

            def on_header(self, name: bytes, value: bytes) -> None:
                done[-1].headers.append((name, value))

            def on_body(self, body: bytes) -> None:
                done[-1].body += body

            def on_message_complete(self) -> None:
                done[-1].method = parser.get_method().decode()

        parser = httptools.HttpRequestParser(Callbacks())
        with conn, contextlib.suppress(OSError, httptools.HttpParserError):
            while data := conn.recv(65536):
                parser.feed_data(data)
                while done and done[0].method:
                    request = done.pop(0)
                    self.seen.append(request)
                    mode = request.target.rsplit(b"/", 1)[-1]
                    count = b"%d" % len(self.seen)
                    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(count), count)
                    conn.sendall(ANSWERS.get(mode, ok))
                    if mode in CLOSING:
                        return


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    interim: list[int]


class Client:
    """A raw client socket that reads answers with a strict framing of its own."""

    def __init__(self, port: int, timeout: float = 3) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        # The server may answer and close before it read it all.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def more(self) -> bool:
        data = b""
        with contextlib.suppress(ConnectionResetError):
            data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            assert self.more(), f"closed {size - len(self.buf)} bytes early"
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            assert self.more(), f"closed inside a line: {self.buf[:200]!r}"
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self, head: bool = False) -> Answer:
        """The next final answer (1xx ones are noted in `interim`)."""
        interim = []
        while True:
            status_line = self._line()
            assert status_line.startswith(b"HTTP/1."), status_line
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while line := self._line():
                name, _, value = line.decode("latin-1").partition(":")
                assert name.lower() not in headers, f"duplicate {name}"
                headers[name.lower()] = value.strip()
            if status >= 200:
                break
            interim.append(status)
        body = b""
        if head or status in (204, 304):
            assert "transfer-encoding" not in headers
        elif headers.get("transfer-encoding") == "chunked":
            while size := int(self._line(), 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._line() == b""
        elif "content-length" in headers:
            body = self._take(int(headers["content-length"]))
        else:
            while self.more():
                pass
            body, self.buf = self.buf, b""
        return Answer(status, headers, body, interim)

    def closed(self, wait: float = 1.0) -> bool:
        """Whether the server closes the connection with nothing more to say."""
        self.sock.settimeout(wait)
        try:
            return not self.more() and not self.buf
        except TimeoutError:
            return False


def gateway_error(answer: Answer, *statuses: int) -> None:
    """The answer is an OpenAI envelope the gateway made itself, with one of `statuses`."""
    assert answer.status in statuses, (answer.status, answer.body[:300])
    assert answer.headers.get("x-fleet-error") == "gateway", answer.headers
    assert set(json.loads(answer.body)["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def raw() -> Iterator[RawEngine]:
    engine = RawEngine()
    yield engine
    engine.listener.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeEngine]:
    with FakeEngine(MODEL, [MODEL, "fake"]) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(raw: RawEngine, fake: FakeEngine) -> Iterator[GatewayThread]:
    base = f"http://127.0.0.1:{raw.port}"
    deployments = {"raw": base, "based": f"{base}/based", "other": f"{base}/other"}
    fleet = f"gateway:\n  max_body_mb: 0.01\ndeployments:\n  fake:\n    model: {MODEL}\n"
    fleet += f"    endpoints: ['{fake.url}']\n"
    for name, url in deployments.items():
        fleet += f"  {name}:\n    model: org/{name}\n    endpoints: ['{url}']\n"
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


@pytest.fixture
def engine(raw: RawEngine, gateway: GatewayThread) -> Iterator[RawEngine]:
    """The raw engine, its record cleared; after the test the gateway must still answer."""
    raw.seen.clear()
    yield raw
    answer = httpx.post(f"{gateway.url}/fake/v1/completions", json={"prompt": "x"}, timeout=5)
    assert answer.status_code == 200, answer.text


def fake_stats(fake: FakeEngine) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{fake.url}/fake/stats").json()
    return stats


def req(method: str, target: str, body: bytes = b"", extra: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body or method == "POST" else b""
    head = b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n" % (
        method.encode(),
        target.encode(),
    )
    return head + length + extra + b"\r\n" + body


def one_request(gateway: GatewayThread, wire: bytes) -> Answer:
    with Client(gateway.port) as client:
        client.send(wire)
        return client.read()


def forwarded(gateway: GatewayThread, engine: RawEngine, wire: bytes) -> tuple[Answer, Seen]:
    """Send one request that must reach the raw engine: the answer, and what it saw."""
    answer = one_request(gateway, wire)
    assert answer.status == 200, answer.body
    (seen,) = engine.seen
    return answer, seen


SMUGGLED = b"GET /raw/smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
POST = b"POST /raw/a HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
GET = b"GET /raw/a HTTP/1.1\r\nHost: t\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

# ---------------------------------------------------------------- smuggling and limits


@pytest.mark.parametrize(
    "wire",
    [
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
        POST + b"Content-Length: 5\r\nContent-Length: 46\r\n\r\nhello",
        POST + b"Content-Length: 5, 5\r\n\r\nhello",
        POST + b"Content-Length: +5\r\n\r\nhello",
        POST + b"Content-Length : 5\r\n\r\nhello",
        POST + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff5\r\nhello\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        POST + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        GET + b"X-A: one\r\n two\r\n\r\n",
        b"GET /raw/a HTTP/1.1\nHost: t\n\n",
        GET + b"X-A: b\nInjected: yes\r\n\r\n",
        GET + b"X-A: b\rInjected: yes\r\n\r\n",
        GET + b"api-key: k\x00x\r\n\r\n",
        GET + b"Host: b\r\n\r\n",
        b"GET /raw/a HTTP/1.1\r\n\r\n",
        GET + b"A: \r\n" * 20_000 + b"\r\n",
        GET + b"X-Big: %s\r\n\r\n" % (b"a" * 100_000),
        b"GET /raw/%s HTTP/1.1\r\nHost: t\r\n\r\n" % (b"a" * 9000),
    ],
    ids=[
        "cl-then-te", "te-then-cl", "two-cl", "cl-list", "cl-plus", "space-before-colon",
        "te-chunked-identity", "te-twice", "te-xchunked", "chunk-overflow", "chunk-negative",
        "chunk-bare-lf", "obs-fold", "bare-lf", "lf-in-value", "cr-in-value", "nul-in-value",
        "two-hosts", "no-host", "20000-headers", "100KB-header", "9KB-url",
    ],
)  # fmt: skip
def test_an_ambiguous_or_oversized_head_is_refused_closed_and_never_forwarded(
    gateway: GatewayThread, engine: RawEngine, wire: bytes
) -> None:
    with Client(gateway.port) as client:
        client.send(wire + SMUGGLED)
        answer = client.read()
        assert answer.status in (400, 414, 431) and b"Traceback" not in answer.body
        assert client.closed()
    assert engine.seen == []


def test_bytes_after_the_body_are_the_next_request_never_part_of_the_body(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    with Client(gateway.port) as client:
        client.send(req("POST", "/raw/a", b"hello") + req("GET", "/raw/second"))
        assert [client.read().status, client.read().status] == [200, 200]
    assert [(s.method, s.target, s.body) for s in engine.seen] == [
        ("POST", b"/a", b"hello"),
        ("GET", b"/second", b""),
    ]


def test_garbage_after_the_body_is_a_400_and_never_part_of_the_body(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    with Client(gateway.port) as client:
        client.send(req("POST", "/raw/a", b"hello") + b" world\r\nX: y\r\n\r\n" + SMUGGLED)
        # The good request is answered first, then the garbage after it.
        assert [client.read().status, client.read().status] == [200, 400]
        assert client.closed()
    assert [(s.target, s.body) for s in engine.seen] == [(b"/a", b"hello")]


def test_a_body_sent_to_a_gateway_endpoint_is_discarded_not_parsed_as_a_request(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    with Client(gateway.port) as client:
        client.send(req("GET", "/health", SMUGGLED) + req("GET", "/health"))
        assert [client.read().status, client.read().status] == [200, 200]
    assert engine.seen == []


def test_chunk_extensions_are_ignored_and_trailers_never_forwarded(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    chunked = b'5;ext=1;q="x"\r\nhello\r\n0\r\nX-Trailer: evil\r\n\r\n'
    _, seen = forwarded(gateway, engine, CHUNKED + chunked)
    assert seen.body == b"hello" and seen.header(b"content-length") == [b"5"]
    assert seen.header(b"x-trailer") == [] and seen.header(b"transfer-encoding") == []


@pytest.mark.parametrize(
    ("start", "end"),
    [(GET + b"X-Big: ", b""), (CHUNKED + b"0\r\nX-T: ", b"\r\n\r\n")],
    ids=["unterminated-header", "1MB-trailer"],
)  # fmt: skip
def test_a_header_or_trailer_line_past_the_limit_is_refused_not_buffered(
    gateway: GatewayThread, engine: RawEngine, start: bytes, end: bytes
) -> None:
    with Client(gateway.port, timeout=1) as client:
        client.send(start)
        time.sleep(0.05)  # the head (and a handler) first, as a slow client sends it
        for _ in range(64):  # 1 MB in one line
            client.send(b"a" * 16384)
        client.send(end)
        assert client.read().status in (400, 431)
    assert engine.seen == []


@pytest.mark.parametrize(
    "rest", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"], ids=["chunk-size", "chunk-end"]
)
def test_a_malformed_chunked_body_after_the_head_gets_a_prompt_400(
    gateway: GatewayThread, engine: RawEngine, rest: bytes
) -> None:
    with Client(gateway.port, timeout=1) as client:
        client.send(CHUNKED)
        time.sleep(0.05)
        client.send(rest)
        assert client.read().status == 400
        assert client.closed()
    assert engine.seen == []


@pytest.mark.parametrize("framing", ["content-length", "chunked", "expect-100"])
def test_a_body_over_max_body_mb_is_413_and_nothing_is_forwarded(
    gateway: GatewayThread, engine: RawEngine, fake: FakeEngine, framing: str
) -> None:
    body = SMUGGLED * 500  # 20 KB, over the fleet's 0.01 MB, and requests inside
    before = fake_stats(fake)["requests"]
    head = b"POST /fake/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    with Client(gateway.port) as client:
        if framing == "chunked":
            client.send(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for part in (body[i : i + 4096] for i in range(0, len(body), 4096)):
                client.send(b"%x\r\n%s\r\n" % (len(part), part))
            client.send(b"0\r\n\r\n")
        else:
            expect = b"Expect: 100-continue\r\n" if framing == "expect-100" else b""
            client.send(head + expect + b"Content-Length: %d\r\n\r\n" % len(body))
            if not expect:
                client.send(body)
        answer = client.read()
        gateway_error(answer, 413)
        assert answer.interim == []  # never invited to send what will be refused
        if framing == "expect-100":
            client.send(body)  # a client that sends anyway: still never a request
            assert client.closed() or client.read().status == 400
    assert fake_stats(fake)["requests"] == before
    assert engine.seen == []


def test_a_body_sent_byte_by_byte_still_arrives_whole(
    gateway: GatewayThread, engine: RawEngine, fake: FakeEngine
) -> None:
    body = json.dumps({"model": "x", "prompt": "slow", "max_tokens": 2}).encode()
    with Client(gateway.port) as client:
        client.send(
            b"POST /fake/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        for byte in body:
            client.send(bytes([byte]))
            time.sleep(0.005)
        assert client.read().status == 200
    seen = fake_stats(fake)["last_request"]
    assert seen["body"] == {"model": MODEL, "prompt": "slow", "max_tokens": 2}


def test_hundreds_of_idle_and_half_sent_connections_do_not_block_a_request(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(300)]
    try:
        for sock in idle[::2]:
            sock.sendall(b"POST /raw/a HTTP/1.1\r\nHost: t\r\nContent-Le")
        forwarded(gateway, engine, req("GET", "/raw/alive"))
    finally:
        for sock in idle:
            sock.close()


def test_a_long_pipelined_burst_is_answered_in_full(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    one = req("GET", "/health", extra=b"X-Pad: %s\r\n" % (b"p" * 400))
    with Client(gateway.port) as client:
        client.send(one * 1000)  # 460 KB of small requests, in one go
        assert {client.read().status for _ in range(1000)} == {200}


# ---------------------------------------------------------------- headers towards the engine


@pytest.mark.parametrize(
    ("extra", "name", "allowed"),
    [
        (b"Host: evil.example\r\n", b"host", None),  # replaced: None = the engine's own
        (b"X-Forwarded-For: 6.6.6.6\r\n", b"x-forwarded-for", [b"6.6.6.6, 127.0.0.1"]),
        (b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n", b"x-forwarded-for",
         [b"1.1.1.1, 2.2.2.2, 127.0.0.1"]),
        (b"X-Forwarded-Proto: https\r\n", b"x-forwarded-proto", [b"http"]),
        (b"X-Real-IP: 6.6.6.6\r\n", b"x-real-ip", [b"127.0.0.1"]),
        (b"Proxy-Authorization: Basic c2VjcmV0\r\n", b"proxy-authorization", []),
        (b"Connection: keep-alive, Foo\r\nFoo: bar\r\n", b"foo", []),
        (b"Connection: keep-alive\r\nKeep-Alive: timeout=1\r\n", b"keep-alive", []),
        (b"TE: trailers\r\n", b"te", []),
        (b"Proxy-Connection: keep-alive\r\n", b"proxy-connection", []),
        (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n",
         b"http2-settings", []),  # what `curl --http2 http://...` sends
    ],
    ids=[
        "host", "xff", "two-xff", "proto", "x-real-ip", "proxy-auth", "connection-foo",
        "keep-alive", "te", "proxy-conn", "h2c-upgrade",
    ],
)  # fmt: skip
def test_the_engine_never_sees_client_controlled_hop_headers(
    gateway: GatewayThread,
    engine: RawEngine,
    extra: bytes,
    name: bytes,
    allowed: list[bytes] | None,
) -> None:
    """Host, address and hop-by-hop headers are the gateway's own; peer appended, never
    a client's word taken for it."""
    wire = req("GET", "/raw/a", extra=extra)
    if name == b"host":
        wire = wire.replace(b"Host: t\r\n", b"")
    _, seen = forwarded(gateway, engine, wire)
    assert seen.header(name) == (
        allowed if allowed is not None else [b"127.0.0.1:%d" % engine.port]
    )


def test_percent_encoded_crlf_in_the_path_never_splits_the_engine_request(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    one_request(gateway, req("GET", "/raw/a%0d%0aInjected:%20yes"))
    (seen,) = engine.seen
    assert seen.header(b"injected") == []
    assert seen.target.lower() == b"/a%0d%0ainjected:%20yes"


# ---------------------------------------------------------------- the response path


def test_an_engine_connection_close_is_relayed_once_and_never_reused(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    with Client(gateway.port) as client:
        client.send(req("GET", "/raw/close") + req("GET", "/raw/after"))
        first, second = client.read(), client.read()
    assert (first.status, first.body) == (200, b"close")
    assert "connection" not in first.headers  # the client's own connection stays open
    assert (second.status, second.body) == (200, b"2")
    assert engine.seen[1].conn != engine.seen[0].conn  # a fresh engine connection


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_body_read_to_the_engines_close_is_framed_for_the_client(
    gateway: GatewayThread, engine: RawEngine, version: str
) -> None:
    with Client(gateway.port) as client:
        client.send(b"GET /raw/eof HTTP/%s\r\nHost: t\r\n\r\n" % version.encode())
        assert client.read().body == b"read to the close"
        if version == "1.0":
            assert client.closed()  # the only framing an HTTP/1.0 client has
            return
        client.send(req("GET", "/raw/after"))
        assert client.read().body == b"2"
    assert engine.seen[1].conn != engine.seen[0].conn


@pytest.mark.parametrize("target", ["/raw/head", "/health"])
def test_head_gets_a_head_alone_and_the_connection_stays_in_step(
    gateway: GatewayThread, engine: RawEngine, target: str
) -> None:
    with Client(gateway.port) as client:
        client.send(req("HEAD", target) + req("GET", "/raw/after"))
        head = client.read(head=True)
        assert head.status == 200 and head.headers["content-length"] != "0"
        after = client.read()  # fails to parse if the HEAD answer carried a body
    assert after.status == 200 and after.headers["x-fleet-upstream"] == "raw-0"
    assert [s.method for s in engine.seen] == (["HEAD", "GET"] if "raw" in target else ["GET"])


@pytest.mark.parametrize(
    "extra",
    [b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n", b"X-Big: %s\r\n" % (b"x" * 40000)],
    ids=["repeated-header", "header-too-large"],
)
def test_a_head_refused_while_its_head_is_read_gets_a_head_alone(
    gateway: GatewayThread, engine: RawEngine, extra: bytes
) -> None:
    with Client(gateway.port) as client:
        client.send(req("HEAD", "/raw/a", extra=extra))
        answer = client.read(head=True)
        assert answer.status in (400, 431) and answer.headers["content-length"] != "0"
        client.sock.settimeout(0.5)
        after = client.buf
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            after += client.sock.recv(65536)
        assert after == b""  # nothing after the head (closed, or waiting): no body
    assert engine.seen == []


@pytest.mark.parametrize("mode", ["204", "304", "103", "204junk", "204partial"])
def test_engine_answers_keep_one_answer_per_request(
    gateway: GatewayThread, engine: RawEngine, mode: str
) -> None:
    """Bodiless, interim (1xx) and stray engine answers: exactly one answer per request."""
    with Client(gateway.port, timeout=1.5) as client:
        client.send(req("GET", f"/raw/{mode}"))
        answer = client.read()
        assert answer.status == (200 if mode == "103" else int(mode[:3]))
        assert answer.interim in ([], [103])
        assert answer.body == (b"final" if mode == "103" else b"")
        for _ in range(2):  # later requests get their own answers, not the stray bytes
            client.send(req("GET", "/raw/after"))
            after = client.read()
            assert (after.status, after.body) == (200, b"%d" % len(engine.seen))


def test_a_client_that_leaves_mid_answer_never_leaves_its_bytes_for_the_next_request(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    for _ in range(3):
        with Client(gateway.port) as client:
            client.send(req("GET", "/raw/big"))
            client.more()  # the head and some of the 4 MB body, then away
        answer = one_request(gateway, req("GET", "/raw/after"))
        assert (answer.status, answer.body) == (200, b"%d" % len(engine.seen))


def test_an_http_1_0_client_never_gets_a_1xx(gateway: GatewayThread, engine: RawEngine) -> None:
    with Client(gateway.port) as client:
        client.send(
            b"POST /raw/103 HTTP/1.0\r\nContent-Type: text/plain\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        answer = client.read()
    assert (answer.status, answer.interim, answer.body) == (200, [], b"final")


def test_headers_the_engine_names_in_connection_do_not_reach_the_client(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    answer = one_request(gateway, req("GET", "/raw/hop"))
    assert (answer.status, answer.body) == (200, b"ok")
    assert "foo" not in answer.headers


@pytest.mark.parametrize("mode", ["clte", "twocl", "short"])
def test_broken_engine_framing_is_a_502_or_a_closed_connection_never_a_desync(
    gateway: GatewayThread, engine: RawEngine, mode: str
) -> None:
    with Client(gateway.port) as client:
        client.send(req("GET", f"/raw/{mode}"))
        if mode == "short":  # the head went out already: closing is the only signal left
            while client.more():
                pass
            assert client.buf.startswith(b"HTTP/1.1 200 OK\r\n")
            assert client.buf.endswith(b"\r\n\r\nabc")
            return
        gateway_error(client.read(), 502)
        client.send(req("GET", "/raw/after"))
        assert client.read().body == b"2"


# ---------------------------------------------------------------- path tricks


@pytest.mark.parametrize(
    "target",
    ["/based/../other/v1/models", "/based/%2e%2e/other/x", "/raw/../v1/models"],
    ids=["based-dotdot", "based-pct", "raw-dotdot"],
)
def test_dot_segments_never_take_a_request_to_another_deployment(
    gateway: GatewayThread, engine: RawEngine, target: str
) -> None:
    answer = one_request(gateway, req("GET", target))
    if "x-fleet-upstream" not in answer.headers:  # the gateway answered it itself
        if answer.status != 200:
            gateway_error(answer, 400, 404)
        assert engine.seen == []
        return
    (seen,) = engine.seen
    path = seen.target.split(b"?")[0]
    assert b"/../" not in path and b"/./" not in path and b"%2e" not in path.lower()
    base = {"based-0": b"/based/", "other-0": b"/other/", "raw-0": b"/"}
    assert path.startswith(base[answer.headers["x-fleet-upstream"]])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/raw/a%3Fb%2541", b"/A%3FB%2541"),
        ("/raw/a%FFb", b"/A%FFB"),
        ("/raw/a?q=%0d%0a&r=%2F", b"/A?Q=%0D%0A&R=%2F"),
        ("/raw/a?x=1#frag", b"/A?X=1"),
    ],
    ids=["query-and-percent", "not-utf8", "query-data", "fragment"],
)
def test_percent_encoding_and_query_reach_the_engine_as_sent(
    gateway: GatewayThread, engine: RawEngine, target: str, expected: bytes
) -> None:
    """Decoded once to route, never twice; a `%3F` never becomes a query; no fragment."""
    _, seen = forwarded(gateway, engine, req("GET", target))
    assert seen.target.upper() == expected


def test_encoded_slashes_double_slashes_and_absolute_form_route_predictably(
    gateway: GatewayThread, engine: RawEngine
) -> None:
    with Client(gateway.port) as client:
        client.send(req("GET", "/raw%2Fv1/models") + req("GET", "//raw/v1/models"))
        client.send(req("GET", "http://evil/raw/x"))
        decoded, double, absolute = client.read(), client.read(), client.read()
    assert decoded.headers["x-fleet-upstream"] == "raw-0"  # decoded, then routed
    gateway_error(double, 404)  # `//raw` names no deployment
    assert absolute.headers["x-fleet-upstream"] == "raw-0"  # by its path, not its host
    assert [s.target for s in engine.seen] == [b"/v1/models", b"/x"]
    assert engine.seen[1].header(b"host") == [b"127.0.0.1:%d" % engine.port]


@pytest.mark.parametrize(
    ("twice", "target"),
    [
        (b"Content-Type: multipart/form-data; boundary=x\r\n", "/raw/a"),
        (b"Authorization: Bearer one\r\nAuthorization: Bearer two\r\n", "/raw/a"),
        (b"api-key: one\r\napi-key: two\r\n", "/raw/a"),
        (b"Authorization: Bearer one\r\nAuthorization: Bearer two\r\n", "/v1/models"),
    ],
    ids=["content-type", "authorization", "api-key", "authorization-own-endpoint"],
)
def test_a_header_the_gateway_decides_on_sent_twice_is_a_400(
    gateway: GatewayThread, engine: RawEngine, twice: bytes, target: str
) -> None:
    # The gateway and the engine could each read a different one of the two (which body
    # type, which key), so the request is refused rather than guessed at.
    answer = one_request(
        gateway, req("POST" if target != "/v1/models" else "GET", target, b"{}", twice)
    )
    gateway_error(answer, 400)
    assert json.loads(answer.body)["error"]["message"].startswith("the request has more than one")
    assert engine.seen == []


@pytest.fixture(scope="module")
def keyed(raw: RawEngine) -> Iterator[GatewayThread]:
    """A gateway with an API key in front of the raw engine."""
    gw = GatewayThread(
        f"gateway:\n  api_keys: [sekrit]\ndeployments:\n  raw:\n    model: org/raw\n"
        f"    endpoints: ['http://127.0.0.1:{raw.port}']\n"
    ).start()
    yield gw
    gw.stop()


def test_path_tricks_never_skip_the_api_key(keyed: GatewayThread, engine: RawEngine) -> None:
    targets = [
        "/health/../raw/a", "/metrics/..%2Fraw/a", "/health%2F..%2Fraw/a", "/health/",
        "/fleet//status", "/fleet/./status", "/metrics/../fleet/status", "/fleet%2Fstatus",
        "/v1/models", "/openai/deployments/raw/x", "http://t/fleet/status",
    ]  # fmt: skip
    with Client(keyed.port) as client:
        for target in targets:
            client.send(req("GET", target, b"{}"))
            answer = client.read()
            assert answer.status == 401, ("GET", target, answer.body)
            gateway_error(answer, 401)
            # A request with a body is refused at its head (its body never read), and
            # its connection closes.
            with Client(keyed.port) as other:
                other.send(req("POST", target, b"{}"))
                answer = other.read()
                assert answer.status == 401, ("POST", target, answer.body)
                gateway_error(answer, 401)
                assert answer.headers["connection"] == "close"
                assert other.closed()
    assert engine.seen == []


@pytest.mark.parametrize(
    ("wire", "statuses"),
    [
        (b"POST http://evil/ HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", (404,)),
        (b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", (400, 404)),
        (b"CONNECT raw:443 HTTP/1.1\r\nHost: raw:443\r\n\r\n", (400, 404, 405)),
    ],
    ids=["absolute-form", "options-star", "connect"],
)
def test_odd_request_targets_get_an_envelope_and_reach_no_engine(
    gateway: GatewayThread, engine: RawEngine, wire: bytes, statuses: tuple[int, ...]
) -> None:
    gateway_error(one_request(gateway, wire), *statuses)
    assert engine.seen == []


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        POST + b"Content-Length: 5\r\n" * 2 + b"\r\n",
        CHUNKED + b"ffffffffffffffffff5\r\nhello\r\n0\r\n\r\n",
        GET + b"X-Big: %s\r\n\r\n" % (b"a" * 100_000),
        b"GET /raw/%s HTTP/1.1\r\nHost: t\r\n\r\n" % (b"a" * 9000),
    ],
    ids=["bad-request-line", "two-cl", "chunk-overflow", "100KB-header", "9KB-url"],
)
def test_a_malformed_request_gets_an_openai_envelope(
    gateway: GatewayThread, engine: RawEngine, wire: bytes
) -> None:
    gateway_error(one_request(gateway, wire), 400, 414, 431)
