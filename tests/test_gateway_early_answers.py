"""Answers the gateway gives before it read the whole request reach every client.

A 413 (body over `gateway.max_body_mb`, known from Content-Length), a 401 (a request with
a body and a wrong key, refused at its head) and a 503 (past `gateway.max_connections`)
are given while the client is still sending its body. Clients that send the whole body
before they read (urllib, requests, httpx, the openai SDK; none sends `Expect:
100-continue`) must still get the envelope: the gateway reads and drops what they send
(the lingering close, relay/linger.py), then closes. A client that never stops sending is
cut off at the bounds (`gateway.lingering_max_mb`, `lingering_time`, `lingering_timeout`).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest
import requests

from tests.conftest import wait_until
from tests.gateway_harness import GatewayThread
from tests.test_gateway_hostile import Client
from vllm_fleet.testing.harness import FakeEngine

MODEL = "org/early"
BIG = 64 << 20  # 64 MiB of prompt
CLIENTS = ["urllib", "requests", "httpx", "openai"]


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(MODEL, [MODEL, "m"]) as started:
        yield started


def gateway_for(engine: FakeEngine, settings: str) -> GatewayThread:
    fleet = f"gateway:\n{settings}deployments:\n  m:\n    model: {MODEL}\n"
    return GatewayThread(fleet + f"    endpoints: ['{engine.url}']\n").start()


@pytest.fixture(scope="module")
def limited(engine: FakeEngine) -> Iterator[GatewayThread]:
    gw = gateway_for(engine, "  max_body_mb: 1\n")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def keyed(engine: FakeEngine) -> Iterator[GatewayThread]:
    gw = gateway_for(engine, "  max_body_mb: 100\n  api_keys: [sekrit]\n")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def full(engine: FakeEngine) -> Iterator[GatewayThread]:
    gw = gateway_for(engine, "  max_connections: 1\n")
    yield gw
    gw.stop()


def engine_requests(engine: FakeEngine) -> int:
    count: int = httpx.get(f"{engine.url}/fake/stats").json()["requests"]
    return count


def post_big(client: str, base: str, key: str = "unused") -> tuple[int, dict[str, str], Any]:
    """POST a completion request with a 64 MiB prompt, no `Expect: 100-continue`, with
    `client`: the answer's status, headers (lower-case names) and JSON body."""
    url = f"{base}/m/v1/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    body = b'{"prompt": "' + b"x" * BIG + b'"}'
    if client == "urllib":
        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                raise AssertionError(f"answered {resp.status}")
        except urllib.error.HTTPError as exc:
            found = {k.lower(): v for k, v in exc.headers.items()}
            return exc.code, found, json.load(exc)
    if client == "requests":
        answer = requests.post(url, data=body, headers=headers, timeout=120)
        found = {k.lower(): v for k, v in answer.headers.items()}
        return answer.status_code, found, answer.json()
    if client == "httpx":
        reply = httpx.post(url, content=body, headers=headers, timeout=120)
        return reply.status_code, dict(reply.headers), reply.json()
    sdk = openai.OpenAI(base_url=f"{base}/m/v1", api_key=key, max_retries=0, timeout=120)
    try:
        sdk.completions.create(model="m", prompt="x" * BIG)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers), exc.response.json()
    raise AssertionError("answered")


def assert_envelope(answer: tuple[int, dict[str, str], Any], status: int, code: str) -> None:
    got, headers, body = answer
    assert got == status, body
    assert headers["x-fleet-error"] == "gateway"
    assert headers["connection"] == "close"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


@pytest.mark.parametrize("client", CLIENTS)
def test_a_64_mib_body_over_the_limit_gets_the_413_envelope(
    limited: GatewayThread, engine: FakeEngine, client: str
) -> None:
    before = engine_requests(engine)
    assert_envelope(post_big(client, limited.url), 413, "request_too_large")
    assert engine_requests(engine) == before  # nothing of it reached the engine


@pytest.mark.parametrize("client", CLIENTS)
def test_a_wrong_key_with_a_64_mib_body_gets_the_401_envelope(
    keyed: GatewayThread, engine: FakeEngine, client: str
) -> None:
    before = engine_requests(engine)
    assert_envelope(post_big(client, keyed.url, key="wrong"), 401, "invalid_api_key")
    assert engine_requests(engine) == before


@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_past_the_limit_sending_64_mib_gets_the_503_envelope(
    full: GatewayThread, client: str
) -> None:
    wait_until(lambda: full.connection_count() == 0, what="earlier connections closed")
    with socket.create_connection(("127.0.0.1", full.port)) as held:
        wait_until(lambda: full.connection_count() == 1, what="the held connection taken")
        assert_envelope(post_big(client, full.url), 503, "too_many_connections")
        held.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200")  # within the limit: served


def test_the_key_of_a_request_with_a_body_is_checked_at_its_head(
    keyed: GatewayThread, engine: FakeEngine
) -> None:
    """A client that asks to continue gets its 401 instead of a 100, and a good key
    still gets the request through (the check at the head is the only one)."""
    head = (
        b"POST /m/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    with Client(keyed.port) as client:
        client.send(head % b"wrong")
        answer = client.read()
        assert answer.status == 401 and answer.interim == []
        assert client.closed()
    with Client(keyed.port) as client:
        client.send(head % b"sekrit")
        client.send(b"{}")
        answer = client.read()
        assert answer.status == 200 and answer.interim == [100]


# ---------------------------------------------------------------- the bounds

HUGE_HEAD = (
    b"POST /m/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000000000\r\n\r\n"
)


def refused(gw: GatewayThread) -> socket.socket:
    """A connection whose request (100 GB announced) got its 413, the client's body yet
    to come; the gateway lingers on it."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    sock.sendall(HUGE_HEAD)
    answer = b""
    while b"request_too_large" not in answer:
        data = sock.recv(65536)
        assert data, answer
        answer += data
    assert answer.startswith(b"HTTP/1.1 413 ")
    return sock


def send_until_cut_off(sock: socket.socket, pause: float = 0.0) -> OSError:
    """Send zeros (in 64 KiB writes, or a byte every `pause` seconds) until the gateway
    drops the connection; the error that said so."""
    data = b"\0" if pause else b"\0" * 65536
    stop = threading.Event()
    while True:
        try:
            sock.sendall(data)
        except OSError as exc:
            return exc
        if pause:
            stop.wait(pause)


def test_a_client_that_sends_forever_is_cut_off_at_lingering_max_mb(
    engine: FakeEngine,
) -> None:
    gw = gateway_for(engine, "  max_body_mb: 1\n  lingering_max_mb: 2\n  lingering_time: 600\n")
    try:
        with refused(gw) as sock:
            error = send_until_cut_off(sock)
            assert isinstance(error, BrokenPipeError | ConnectionResetError), error
        wait_until(lambda: gw.connection_count() == 0, what="the connection closed")
    finally:
        gw.stop()


def test_a_client_that_trickles_forever_is_cut_off_at_lingering_time(
    engine: FakeEngine,
) -> None:
    gw = gateway_for(engine, "  max_body_mb: 1\n  lingering_time: 0.5\n  lingering_timeout: 60\n")
    try:
        with refused(gw) as sock:
            # Never silent for long, never many bytes: only lingering_time ends it.
            error = send_until_cut_off(sock, pause=0.02)
            assert isinstance(error, BrokenPipeError | ConnectionResetError), error
    finally:
        gw.stop()


def test_a_client_gone_silent_is_closed_after_lingering_timeout(engine: FakeEngine) -> None:
    gw = gateway_for(engine, "  max_body_mb: 1\n  lingering_timeout: 0.3\n")
    try:
        with refused(gw):
            wait_until(lambda: gw.connection_count() == 0, what="closed once silent")
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def patient(engine: FakeEngine) -> Iterator[GatewayThread]:
    """A gateway whose lingering ends only when the client closes (or past 2 GB)."""
    settings = "  max_body_mb: 1\n  lingering_time: 3600\n  lingering_timeout: 3600\n"
    gw = gateway_for(engine, settings + "  lingering_max_mb: 2000\n")
    yield gw
    gw.stop()


def test_a_client_that_closes_ends_the_lingering(patient: GatewayThread) -> None:
    with refused(patient) as sock:
        sock.sendall(b"x" * 100_000)
        assert sock.recv(1) == b""  # the answer ended: the gateway shut its side
        assert patient.connection_count() == 1  # ...and reads on, lingering
    wait_until(lambda: patient.connection_count() == 0, what="closed with the client")


def test_lingering_time_0_closes_at_once(engine: FakeEngine) -> None:
    gw = gateway_for(engine, "  max_body_mb: 1\n  lingering_time: 0\n")
    try:
        with refused(gw):
            wait_until(lambda: gw.connection_count() == 0, what="closed without lingering")
    finally:
        gw.stop()


def test_a_request_read_whole_never_lingers(patient: GatewayThread) -> None:
    """`Connection: close` after a request read whole closes at once, as before."""
    with Client(patient.port) as client:
        client.send(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert client.read().status == 200
        assert client.closed()
        wait_until(lambda: patient.connection_count() == 0, what="closed, the client still there")


def test_an_answer_closing_the_connection_ends_it_before_a_broken_request_behind(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by fuzzing: a request answered with `Connection: close` while a malformed
    request pipelined behind it had already stopped the parser. The first answer started
    the lingering close (the write side shut); the second's 400 was then written after
    it, which raised inside data_received (a traceback, the connection reset)."""
    gw = gateway_for(engine, "  max_body_mb: 1\n")
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(
                b"GET /nowhere/v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                b"POST /m/v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header\r\n"
            )
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 404 "), bytes(answer[:200])
        assert answer.count(b"HTTP/1.1 ") == 1, bytes(answer)  # nothing after the close
        wait_until(lambda: gw.connection_count() == 0, what="the connection closed")
        assert not [r for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]
    finally:
        gw.stop()
