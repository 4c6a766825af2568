"""The gateway's HTTP/1.1 on the wire, spoken over raw sockets: what a framework used to
get right for it and the gateway (a protocol-level relay) must get right itself.

Keep-alive and pipelining on one connection, chunked request bodies, `Expect:
100-continue`, HTTP/1.0, malformed and oversized requests, Upgrade, and a pooled engine
connection that the engine closed. Responses are read with llhttp (httptools), the
parser the gateway uses, so a framing mistake shows up as a parse error here.
"""

from __future__ import annotations

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
from vllm_fleet.testing.harness import FakeEngine, free_port

MODEL = "org/wire"


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False


class Reader:
    """Reads responses off one socket, in order, with llhttp."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Response] = []
        self.current = Response()
        self.closed = False

    def on_message_begin(self) -> None:
        self.current = Response()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.complete = True
        self.done.append(self.current)

    def read(self, count: int = 1) -> list[Response]:
        """The next `count` responses (fewer when the server closes first)."""
        while len(self.done) < count:
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                break
            self.parser.feed_data(data)
        taken, self.done = self.done[:count], self.done[count:]
        return taken

    def closes(self) -> bool:
        """Whether the server closes the connection (after what it sent already)."""
        self.sock.settimeout(5)
        try:
            while data := self.sock.recv(65536):
                self.parser.feed_data(data)
        except ConnectionResetError:
            pass
        return True


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(MODEL, [MODEL, "wire"]) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(engine: FakeEngine) -> Iterator[GatewayThread]:
    fleet = f"""
gateway:
  max_body_mb: 0.01
deployments:
  wire:
    model: {MODEL}
    endpoints: ["{engine.url}"]
"""
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def connect(gateway: GatewayThread) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    return sock, Reader(sock)


def post(path: str, body: dict[str, Any], extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (path.encode(), len(data), extra, data)
    )


def last_request(engine: FakeEngine) -> dict[str, Any]:
    seen: dict[str, Any] = httpx.get(f"{engine.url}/fake/stats").json()["last_request"]
    return seen


def test_pipelined_requests_on_one_connection_are_answered_in_order(
    gateway: GatewayThread,
) -> None:
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/wire/v1/completions", {"prompt": "x", "max_tokens": 3})
            + b"GET /nope/v1/models HTTP/1.1\r\nHost: t\r\n\r\n"
            + post("/wire/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True})
        )
        health, plain, missing, stream = reader.read(4)
        assert health.status == 200 and json.loads(health.body)["status"] == "ok"
        assert plain.status == 200
        assert json.loads(plain.body)["choices"][0]["text"] == "tok0 tok1 tok2"
        assert missing.status == 404 and missing.headers["x-fleet-error"] == "gateway"
        assert stream.status == 200 and stream.body.endswith(b"data: [DONE]\n\n")
        # The connection is still usable afterwards (keep-alive).
        sock.sendall(b"GET /wire/health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reader.read()[0].status == 200


def test_chunked_request_body_is_read_whole_and_rewritten(
    gateway: GatewayThread, engine: FakeEngine
) -> None:
    body = json.dumps({"model": "anything", "prompt": "x", "max_tokens": 2}).encode()
    parts = [body[:10], body[10:25], body[25:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"POST /wire/v1/completions HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        (answer,) = reader.read()
    assert answer.status == 200, answer.body
    assert last_request(engine)["model"] == MODEL


def test_expect_100_continue_gets_continue_before_the_body(gateway: GatewayThread) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"POST /wire/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        reader.parser.feed_data(interim[interim.index(b"\r\n\r\n") + 4 :])
        sock.sendall(body)
        (answer,) = reader.read()
    assert answer.status == 200


def test_http_1_0_request_is_answered_and_closed(gateway: GatewayThread) -> None:
    sock, _ = connect(gateway)
    with sock:
        sock.sendall(b"GET /wire/v1/models HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.")
    assert b" 200 " in data.split(b"\r\n", 1)[0]
    assert MODEL.encode() in data


def test_malformed_request_line_is_400_and_the_connection_closes(
    gateway: GatewayThread,
) -> None:
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET / HTTP/1.1 extra words\r\nHost: t\r\n\r\n")
        answers = reader.read()
        assert answers and answers[0].status == 400
        assert b"Traceback" not in answers[0].body
        assert reader.closes()
    assert httpx.get(f"{gateway.url}/health").status_code == 200


def test_oversized_headers_are_refused_and_the_connection_closes(
    gateway: GatewayThread,
) -> None:
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        answers = reader.read()
        assert answers and answers[0].status in (400, 431)
        assert reader.closes()
    assert httpx.get(f"{gateway.url}/health").status_code == 200


def test_body_over_the_limit_in_chunks_is_413(gateway: GatewayThread) -> None:
    chunk = b"x" * 4096
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"POST /wire/v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(4):  # 16 KB, over the fleet's 0.01 MB
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before the rest is sent
        answers = reader.read()
    assert answers and answers[0].status == 413


def test_an_answer_bigger_than_every_buffer_reaches_a_slow_client_whole() -> None:
    """The client's socket takes little at a time, so the gateway's send buffer fills and
    it must stop reading the engine (flow control), then go on when the client reads."""
    tokens = 400_000  # about 3 MB of text, more than the kernel and transport buffers
    with FakeEngine("org/big", ["org/big"], "--max-model-len", str(tokens)) as big:
        gw = GatewayThread(
            f"deployments:\n  big:\n    model: org/big\n    endpoints: ['{big.url}']\n"
        ).start()
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            sock.settimeout(30)
            with sock:
                sock.sendall(post("/big/v1/completions", {"prompt": "x", "max_tokens": tokens}))
                time.sleep(1.0)  # not reading: the buffers between engine and client fill
                reader = Reader(sock)
                (answer,) = reader.read()
                sock.sendall(b"GET /big/health HTTP/1.1\r\nHost: t\r\n\r\n")
                (after,) = reader.read()  # the same connection still works
        finally:
            gw.stop()
    assert answer.status == 200
    assert len(answer.body) == int(answer.headers["content-length"])
    text = json.loads(answer.body)["choices"][0]["text"]
    assert text.endswith(f"tok{tokens - 1}") or text.endswith(f"tok{tokens - 1} ")
    assert after.status == 200


def test_upgrade_request_is_refused(gateway: GatewayThread) -> None:
    sock, reader = connect(gateway)
    with sock:
        sock.sendall(
            b"GET /wire/v1/models HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        answers = reader.read()
        assert answers and answers[0].status == 400
        assert reader.closes()


class OneAnswerEngine:
    """An engine that answers the first request on each connection and closes the
    connection, unanswered, when a second request arrives on it: the race of an engine's
    idle timeout with a proxy reusing its pooled connection, made certain."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.connections = 0
        self.dropped = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            for answered in (False, True):
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                if answered:
                    self.dropped += 1
                    return  # close without a byte of answer
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )

    def close(self) -> None:
        self.listener.close()


def test_a_pooled_connection_the_engine_closed_is_retried_on_a_fresh_one() -> None:
    engine = OneAnswerEngine()
    gw = GatewayThread(
        f"deployments:\n  e:\n    model: org/e\n    endpoints: ['http://127.0.0.1:{engine.port}']\n"
    ).start()
    try:
        with httpx.Client(base_url=gw.url) as client:
            for _ in range(3):
                answer = client.post("/e/v1/completions", json={"prompt": "x"})
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"ok": True}
        assert engine.dropped == 2  # requests 2 and 3 met a closed pooled connection...
        assert engine.connections == 3  # ...and each went once more on a fresh one
    finally:
        gw.stop()
        engine.close()
