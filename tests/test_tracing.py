"""Tracing hooks: every answer carries one `x-request-id` (the client's when sane, else a
new one), the engine gets it as `X-Request-Id` (vLLM's request id), `traceparent` and
`tracestate` reach the engine as they came, and the access log names both ids.

A real gateway in front of fake engines (one as vLLM with --enable-request-id-headers)
and of a raw socket engine of a few lines, whose answers carry an id of their own (or
two) and which keeps each request head exactly as it read it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.gateway.relay.request import sane_id, trace_id
from vllm_fleet.gateway.relay.wire import one_request_id
from vllm_fleet.testing.harness import FakeEngine, free_port

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
NEW_ID = re.compile(r"[0-9a-f]{32}")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


class RawEngine:
    """An engine on a real socket that answers every request 200 with a small JSON body
    and `extra` header lines, and keeps each request head it read (the bytes as sent)."""

    def __init__(self, extra: bytes) -> None:
        self.extra = extra
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    read = conn.recv(65536)
                    if not read:
                        return
                    data += read
                head, _, data = data.partition(b"\r\n\r\n")
                found = re.search(rb"(?im)^content-length: *(\d+)", head)
                length = int(found.group(1)) if found else 0
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                self.heads.append(head)
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n%s\r\n%s" % (len(body), self.extra, body)
                )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, FakeEngine]]:
    started = {
        "plain": FakeEngine("org/plain", ["org/plain", "plain"]).start(),
        "echo": FakeEngine("org/echo", ["org/echo"], "--enable-request-id-headers").start(),
    }
    yield started
    for engine in started.values():
        engine.stop()


@pytest.fixture(scope="module")
def raw() -> Iterator[dict[str, RawEngine]]:
    started = {
        "other": RawEngine(b"x-request-id: the-engines-own\r\n"),
        "twice": RawEngine(b"x-request-id: one\r\nX-Request-ID: two\r\n"),
    }
    yield started
    for engine in started.values():
        engine.close()


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "access.log"


@pytest.fixture(scope="module")
def gateway(
    engines: dict[str, FakeEngine], raw: dict[str, RawEngine], access_log: Path
) -> Iterator[GatewayThread]:
    fleet = f"""
gateway:
  access_log: {access_log}
deployments:
  plain:
    model: org/plain
    endpoints: ["{engines["plain"].url}"]
  echo:
    model: org/echo
    endpoints: ["{engines["echo"].url}"]
  other:
    model: org/other
    endpoints: ["{raw["other"].url}"]
  twice:
    model: org/twice
    endpoints: ["{raw["twice"].url}"]
  down:
    model: org/down
    endpoints: ["http://127.0.0.1:{free_port()}"]
"""
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def sdk(gateway: GatewayThread, deployment: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/{deployment}/v1", api_key="unused")


def last_request(engine: FakeEngine) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{engine.url}/fake/stats").json()["last_request"]
    return data


def chat(gateway: GatewayThread, deployment: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/{deployment}/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 2},
        headers=headers,
    )


def head_lines(head: bytes, name: bytes) -> list[bytes]:
    """The values of header `name` in a request head, as sent."""
    found = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.lower() == name:
            found.append(value.strip())
    return found


# ---------------------------------------------------------------- the request's id


def test_an_id_is_made_when_the_client_sends_none_and_each_is_new(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    raw = sdk(gateway, "plain").chat.completions.with_raw_response.create(
        model="x", messages=MESSAGES, max_tokens=2
    )
    assert raw.parse().choices[0].message.content == "tok0 tok1"
    made = raw.request_id
    assert made is not None and NEW_ID.fullmatch(made)
    assert last_request(engines["plain"])["headers"]["x-request-id"] == made  # vLLM's id
    with httpx.Client() as client:  # one keep-alive connection
        ids = [
            client.post(
                f"{gateway.url}/plain/v1/completions", json={"prompt": "x", "max_tokens": 1}
            ).headers["x-request-id"]
            for _ in range(50)
        ]
    assert len(set(ids) | {made}) == 51
    assert all(NEW_ID.fullmatch(i) for i in ids)


def test_the_clients_id_is_kept_and_sent_to_the_engine(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    mine = "req-2026/12/03:team-a#" + "x" * 100  # visible ASCII, 122 bytes
    raw = sdk(gateway, "plain").chat.completions.with_raw_response.create(
        model="x", messages=MESSAGES, max_tokens=2, extra_headers={"X-Request-Id": mine}
    )
    assert raw.request_id == mine
    assert raw.headers.get_list("x-request-id") == [mine]
    assert last_request(engines["plain"])["headers"]["x-request-id"] == mine
    # A streamed answer (chunked to the client) carries it too.
    stream = sdk(gateway, "plain").chat.completions.with_raw_response.create(
        model="x", messages=MESSAGES, max_tokens=2, stream=True,
        extra_headers={"x-request-id": "stream-1"},
    )  # fmt: skip
    assert stream.request_id == "stream-1"
    assert len(list(stream.parse())) > 1


def test_the_engine_gets_the_id_once(gateway: GatewayThread, raw: dict[str, RawEngine]) -> None:
    before = len(raw["other"].heads)
    assert chat(gateway, "other", **{"X-Request-Id": "abc-1"}).status_code == 200
    (head,) = raw["other"].heads[before:]
    assert head_lines(head, b"x-request-id") == [b"abc-1"]
    assert chat(gateway, "other").status_code == 200
    made = head_lines(raw["other"].heads[-1], b"x-request-id")
    assert len(made) == 1 and NEW_ID.fullmatch(made[0].decode())


@pytest.mark.parametrize(
    "sent",
    [
        [(b"X-Request-Id", b"x" * 129)],  # too long
        [(b"X-Request-Id", b"two words")],
        [(b"X-Request-Id", b"tab\there")],
        [(b"X-Request-Id", b"caf\xc3\xa9")],  # not ASCII
        [(b"X-Request-Id", b"")],
        [(b"X-Request-Id", b"first"), (b"X-Request-Id", b"second")],  # which one?
    ],
    ids=["129-bytes", "space", "tab", "utf-8", "empty", "twice"],
)
def test_an_insane_id_is_replaced_by_a_new_one(
    gateway: GatewayThread, engines: dict[str, FakeEngine], sent: list[tuple[bytes, bytes]]
) -> None:
    response = httpx.post(
        f"{gateway.url}/plain/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=sent
    )
    assert response.status_code == 200
    (made,) = response.headers.get_list("x-request-id")
    assert NEW_ID.fullmatch(made)
    assert last_request(engines["plain"])["headers"]["x-request-id"] == made


def test_an_id_of_128_visible_bytes_is_kept(gateway: GatewayThread) -> None:
    mine = "".join(chr(c) for c in range(0x21, 0x7F)) + "z" * 34  # 94 + 34 = 128
    response = chat(gateway, "plain", **{"X-Request-Id": mine})
    assert response.headers["x-request-id"] == mine


def test_sane_ids() -> None:
    assert sane_id(b"a") and sane_id(b"~" * 128) and sane_id(b'{"json":"ok"}')
    assert not sane_id(b"") and not sane_id(b"a" * 129)
    assert not sane_id(b"a b") and not sane_id(b"a\tb") and not sane_id(b"\xff")


# ---------------------------------------------------------------- one id in an answer


def test_a_vllm_engine_that_echoes_the_id_gives_one_id(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    # The engine answers `X-Request-Id` itself (vLLM --enable-request-id-headers).
    direct = httpx.post(
        f"{engines['echo'].url}/v1/completions",
        json={"model": "org/echo", "prompt": "x", "max_tokens": 1},
        headers={"X-Request-Id": "echoed"},
    )
    assert direct.headers.get_list("x-request-id") == ["echoed"]
    mine = chat(gateway, "echo", **{"X-Request-Id": "mine-7"})
    assert mine.headers.get_list("x-request-id") == ["mine-7"]
    made = chat(gateway, "echo")
    (made_id,) = made.headers.get_list("x-request-id")
    assert NEW_ID.fullmatch(made_id)
    assert last_request(engines["echo"])["headers"]["x-request-id"] == made_id


@pytest.mark.parametrize("deployment", ["other", "twice"])
def test_an_engine_with_another_id_gives_way_to_the_gateways(
    gateway: GatewayThread, deployment: str
) -> None:
    # The id the client sent (or was given, and the access log names) wins.
    assert chat(gateway, deployment, **{"X-Request-Id": "client-9"}).headers.get_list(
        "x-request-id"
    ) == ["client-9"]
    (made,) = chat(gateway, deployment).headers.get_list("x-request-id")
    assert NEW_ID.fullmatch(made)


def test_one_request_id_keeps_the_engines_line_when_the_same() -> None:
    lines = [b"date: now\r\n", b"x-request-id: abc\r\n", b"content-type: a/b\r\n"]
    one_request_id(lines, b"abc")
    assert lines == [b"date: now\r\n", b"content-type: a/b\r\n", b"x-request-id: abc\r\n"]
    lines = [b"X-Request-Id: other\r\n", b"x-request-id: abc\r\n", b"x-request-idx: 1\r\n"]
    one_request_id(lines, b"abc")
    assert lines == [b"x-request-idx: 1\r\n", b"x-request-id: abc\r\n"]
    lines = [b"x-request-id: other\r\n"]
    one_request_id(lines, b"abc")
    assert lines == [b"X-Request-Id: abc\r\n"]
    lines = [b"x-fake-engine: m:1\r\n"]
    one_request_id(lines, b"abc")
    assert lines == [b"x-fake-engine: m:1\r\n", b"X-Request-Id: abc\r\n"]


# ---------------------------------------------------------------- the gateway's own answers


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/nowhere/v1/chat/completions", 404),  # no such deployment
        ("POST", "/down/v1/chat/completions", 503),  # its engine is not there
        ("POST", "/v1/chat/completions", 400),  # no `model` to route by
        ("GET", "/health", 200),
        ("GET", "/v1/models", 200),
        ("HEAD", "/v1/models", 200),
        ("GET", "/fleet/usage", None),  # no ledger in this fleet: refused
        ("POST", "/fleet/deployments/plain/load", None),
    ],
)
def test_the_gateways_own_answers_carry_the_id(
    gateway: GatewayThread, method: str, path: str, status: int | None
) -> None:
    body = json.dumps({"messages": MESSAGES}).encode() if method == "POST" else None
    made = httpx.request(method, gateway.url + path, content=body)
    assert status is None or made.status_code == status, made.text
    (made_id,) = made.headers.get_list("x-request-id")
    assert NEW_ID.fullmatch(made_id)
    kept = httpx.request(method, gateway.url + path, content=body, headers={"x-request-id": "k1"})
    assert kept.status_code == made.status_code
    assert kept.headers.get_list("x-request-id") == ["k1"]


def raw_answer(gateway: GatewayThread, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while read := sock.recv(65536):
            answer += read
    return answer


def test_a_refused_malformed_request_carries_an_id_too(gateway: GatewayThread) -> None:
    # Refused by the parser (no Host), and mid-head (a header line over the limit): the
    # id the client sent before that is kept, else one is made.
    no_host = raw_answer(gateway, b"GET /health HTTP/1.1\r\nX-Request-Id: bad-1\r\n\r\n")
    assert no_host.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nX-Request-Id: bad-1\r\n" in no_host.partition(b"\r\n\r\n")[0]
    huge = raw_answer(
        gateway, b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    )
    assert huge.startswith(b"HTTP/1.1 431 ")
    (made,) = re.findall(rb"\r\nX-Request-Id: ([^\r]*)\r\n", huge.partition(b"\r\n\r\n")[0])
    assert NEW_ID.fullmatch(made.decode())


# ---------------------------------------------------------------- trace context


def test_traceparent_and_tracestate_reach_the_engine_unchanged(
    gateway: GatewayThread, engines: dict[str, FakeEngine], raw: dict[str, RawEngine]
) -> None:
    sdk(gateway, "plain").chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=1,
        extra_headers={"traceparent": TRACEPARENT, "tracestate": TRACESTATE},
    )  # fmt: skip
    seen = last_request(engines["plain"])["headers"]
    assert seen["traceparent"] == TRACEPARENT and seen["tracestate"] == TRACESTATE
    # One the gateway cannot read is still the client's to send on: unchanged too.
    odd = "01-ABC-not-a-trace"
    assert chat(gateway, "other", traceparent=odd).status_code == 200
    assert head_lines(raw["other"].heads[-1], b"traceparent") == [odd.encode()]


def test_trace_ids() -> None:
    assert trace_id(TRACEPARENT.encode()) == "4bf92f3577b34da6a3ce929d0e0e4736"
    future = TRACEPARENT.replace("00-", "cc-", 1) + "-what-comes-later"
    assert trace_id(future.encode()) == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in [
        TRACEPARENT.upper(),  # hex is lower-case
        TRACEPARENT.replace("00-", "ff-", 1),  # version ff is invalid
        TRACEPARENT + "-more",  # version 00 has exactly four fields
        TRACEPARENT.replace("4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32),
        TRACEPARENT.replace("00f067aa0ba902b7", "0" * 16),
        TRACEPARENT[:-1],
        TRACEPARENT.replace("-", "_"),
        TRACEPARENT.replace("4bf9", "4bg9"),
        "",
    ]:
        assert trace_id(bad.encode()) is None, bad


# ---------------------------------------------------------------- the access log


def logged(path: Path, request_id: str) -> dict[str, Any]:
    """The access log's line for `request_id` (written by a thread: waited for)."""
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            record: dict[str, Any] = json.loads(line)
            if record["request_id"] == request_id:
                return record
        assert time.monotonic() < deadline, f"no line for {request_id}"
        time.sleep(0.02)


def test_the_access_log_names_the_request_id_and_the_trace_id(
    gateway: GatewayThread, access_log: Path
) -> None:
    traced = chat(gateway, "plain", **{"x-request-id": "log-1", "traceparent": TRACEPARENT})
    record = logged(access_log, "log-1")
    assert record["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (
        (record["status"], record["deployment"]) == (traced.status_code, "plain") == (200, "plain")
    )
    made = chat(gateway, "plain", traceparent="00-nonsense")
    record = logged(access_log, made.headers["x-request-id"])
    assert record["trace_id"] is None
    refused = httpx.get(gateway.url + "/nowhere/v1/models")
    assert refused.status_code == 404
    assert logged(access_log, refused.headers["x-request-id"])["status"] == 404
