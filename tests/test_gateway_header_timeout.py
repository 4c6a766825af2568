"""A request head must arrive whole within `gateway.header_timeout` of its first byte
(nginx's client_header_timeout): a slowloris client trickling its head in gets 408 and
its connection closes, so it cannot hold a connection slot for ever; a client that sends
its head in pieces, but within the time, is served."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import wait_until
from tests.gateway_harness import GatewayThread
from vllm_fleet.testing.harness import FakeEngine

MODEL = "org/heads"


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayThread]:
    with FakeEngine(MODEL, [MODEL, "m"]) as engine:
        fleet = (
            "gateway:\n  header_timeout: 1\n"
            f"deployments:\n  m:\n    model: {MODEL}\n    endpoints: ['{engine.url}']\n"
        )
        gw = GatewayThread(fleet).start()
        yield gw
        gw.stop()


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_a_trickled_head_gets_408_and_the_connection_closes(gateway: GatewayThread) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        sock.sendall(b"POST /m/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        # A header byte every 0.2 s, for ever: only the gateway ends this (the sweep runs
        # every few seconds, so the 408 comes some seconds after the 1 s timeout).
        for _ in range(300):
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.2)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(30)
        answer += _read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert "header_timeout" in error["message"]
    # The slot is free again.
    wait_until(lambda: gateway.connection_count() == 0, what="the slow connection closed")


def test_a_head_sent_in_pieces_within_the_timeout_is_served(gateway: GatewayThread) -> None:
    body = json.dumps({"messages": [], "max_tokens": 2}).encode()
    head = (
        b"POST /m/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        for piece in (head[:20], head[20:60], head[60:]):
            sock.sendall(piece)
            time.sleep(0.2)  # 0.6 s in all, under the 1 s timeout
        sock.sendall(b"\r\n\r\n" + body)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
