"""Cases the fuzzer (`make fuzz`, tests/fuzz/) found, one test each, named for the case.

Each ran against the real gateway (a GatewayThread) in front of the fuzzer's recording
engine (tests/fuzz/upstream.py), over raw sockets; the answers are read with h11.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time
from collections.abc import Iterator

import aiohttp
import h11
import pytest

from tests.fuzz.oracle import LEAKS
from tests.fuzz.upstream import RecordingEngine, Seen
from tests.gateway_harness import GatewayThread
from vllm_fleet.engines.remote import probe
from vllm_fleet.testing.harness import free_port


@pytest.fixture(scope="module")
def engine() -> Iterator[RecordingEngine]:
    started = RecordingEngine()
    yield started
    started.close()


@pytest.fixture(scope="module")
def gateway(engine: RecordingEngine) -> Iterator[GatewayThread]:
    fleet = (
        "gateway:\n  max_body_mb: 0.0625\ndeployments:\n  raw:\n    model: org/raw\n"
        f"    endpoints: ['http://127.0.0.1:{engine.port}/e/raw']\n"
    )
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def records(engine: RecordingEngine) -> list[Seen]:
    time.sleep(0.05)  # what the gateway forwards (if anything) lands
    seen = []
    while True:
        try:
            seen.append(engine.records.get_nowait())
        except queue.Empty:
            return seen


@pytest.fixture
def clean(engine: RecordingEngine) -> RecordingEngine:
    records(engine)
    return engine


def exchange(
    gateway: GatewayThread, wire: bytes, methods: tuple[str, ...] = ("GET",)
) -> list[tuple[h11.Response, bytes]]:
    """Send `wire`; the answers to `methods` (one per request), read with h11."""
    conn = h11.Connection(h11.CLIENT)
    answers: list[tuple[h11.Response, bytes]] = []
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=3) as sock:
        sock.sendall(wire)
        for method in methods:
            if answers:
                conn.start_next_cycle()
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
            conn.send(h11.EndOfMessage())
            head, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return answers
            assert head is not None
            answers.append((head, body))
    return answers


def envelope(body: bytes) -> dict[str, object]:
    error: dict[str, object] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def request(target: str = "/raw/v1/x", extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET %s %s\r\nHost: t\r\nX-Fuzz-Id: r0\r\n%s\r\n" % (target.encode(), version, extra)


def test_fuzz_unreachable_remote_endpoint_message_names_no_exception_class() -> None:
    """The 503 for a remote endpoint that stopped answering carries the probe's words:
    `ClientConnectorError: Cannot connect ...` was sent to clients."""

    async def run() -> str | None:
        async with aiohttp.ClientSession() as session:
            return await probe(session, f"http://127.0.0.1:{free_port()}", 1.0)

    problem = asyncio.run(run())
    assert problem is not None and "Cannot connect" in problem
    assert not LEAKS.search(problem.encode()), problem


def test_fuzz_invalid_engine_answer_502_names_no_exception_class(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    """An engine answering `HTTP/1.1 2x0`: the 502 said `HttpParserInvalidStatusError`."""
    ((head, body),) = exchange(gateway, request(extra=b"X-Fuzz-Answer: bad\r\n"))
    assert head.status_code == 502
    message = str(envelope(body)["message"])
    assert "failed before answering: Invalid status code" in message
    assert not LEAKS.search(body), body


def test_fuzz_broken_stream_event_names_no_exception_class(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    """An engine breaking off an SSE stream: the error event said `UpstreamClosed`."""
    ((head, body),) = exchange(gateway, request(extra=b"X-Fuzz-Answer: ssecut\r\n"))
    assert head.status_code == 200
    assert b"broke off the stream: the engine closed the connection" in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert not LEAKS.search(body), body


@pytest.mark.parametrize(("body", "kind"), [(b"null", "null"), (b"[1]", "an array")])
def test_fuzz_json_body_that_is_no_object_is_named_in_json_words(
    gateway: GatewayThread, clean: RecordingEngine, body: bytes, kind: str
) -> None:
    """`null` as the body: the 400 said `not NoneType`."""
    wire = b"POST /raw/v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ((head, answer),) = exchange(gateway, wire, ("POST",))
    assert head.status_code == 400
    assert envelope(answer)["message"] == f"the request body must be a JSON object, not {kind}"
    assert records(clean) == []


def test_fuzz_json_nested_deeper_than_the_json_module_writes_is_400_not_500(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    """1000 nested arrays: orjson reads them (up to 1024), cannot write them back (254), and
    the json module's fallback ran out of recursion: a 500."""
    body = b'{"model":"x","x":%s%s}' % (b"[" * 1000, b"]" * 1000)
    wire = b"POST /raw/v1/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ((head, answer),) = exchange(gateway, wire, ("POST",))
    assert head.status_code == 400
    assert envelope(answer)["code"] == "invalid_json"
    assert records(clean) == []


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate, chunked", b"identity, chunked"])
def test_fuzz_transfer_coding_besides_chunked_is_501_never_forwarded(
    gateway: GatewayThread, clean: RecordingEngine, coding: bytes
) -> None:
    """`Transfer-Encoding: gzip, chunked`: llhttp decoded the chunks and the engine got a
    body still gzip-coded, with nothing saying so."""
    wire = request(extra=b"Transfer-Encoding: %s\r\n" % coding).replace(b"GET", b"POST")
    ((head, body),) = exchange(gateway, wire + b"5\r\nhello\r\n0\r\n\r\n", ("POST",))
    assert head.status_code == 501
    assert envelope(body)["code"] == "unsupported_transfer_coding"
    assert records(clean) == []


@pytest.mark.parametrize("host", [b"a b", b"a/b", b"a@b", b"t:80:80", b"[::1", b"<t>", b"t?x"])
def test_fuzz_host_that_names_no_host_is_400_never_forwarded(
    gateway: GatewayThread, clean: RecordingEngine, host: bytes
) -> None:
    """`Host: a b` was forwarded (as the engine's X-Forwarded-Host); RFC 9112 3.2: 400."""
    wire = request().replace(b"Host: t", b"Host: " + host)
    ((head, body),) = exchange(gateway, wire)
    assert head.status_code == 400 and envelope(body)["param"] == "Host"
    assert records(clean) == []


@pytest.mark.parametrize("host", [b"t", b"example.com:8080", b"[::1]:80", b"10.0.0.1", b""])
def test_fuzz_host_check_lets_every_host_form_through(
    gateway: GatewayThread, clean: RecordingEngine, host: bytes
) -> None:
    wire = request().replace(b"Host: t", b"Host: " + host)
    ((head, _),) = exchange(gateway, wire)
    assert head.status_code == 200
    (seen,) = records(clean)
    assert seen.header(b"x-forwarded-host") == [host]


def test_fuzz_http_1_0_request_with_two_hosts_is_400(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    wire = request(extra=b"Host: u\r\n", version=b"HTTP/1.0")
    ((head, _),) = exchange(gateway, wire)
    assert head.status_code == 400
    assert records(clean) == []


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9"])
def test_fuzz_request_line_of_http_2_0_or_0_9_is_505_never_forwarded(
    gateway: GatewayThread, clean: RecordingEngine, version: bytes
) -> None:
    """llhttp reads `HTTP/2.0` and `HTTP/0.9` request lines; the gateway forwarded them
    (as HTTP/1.1, to the engine)."""
    ((head, body),) = exchange(gateway, request(version=version))
    assert head.status_code == 505
    assert envelope(body)["code"] == "unsupported_version"
    assert records(clean) == []


def test_fuzz_no_100_continue_before_the_head_is_whole(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    """`Expect:` arrived in a read that ended inside the head: the gateway sent `100
    Continue` at once, before it knew what was expected (here a 417) or for which head."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=1) as sock:
        sock.sendall(b"GET /raw/v1/x HTTP/1.1\r\nHost: t\r\nExpect: something-else\r\nA")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # nothing yet: the head is not whole
        sock.settimeout(3)
        sock.sendall(b": b\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 417 "), answer
    assert records(clean) == []


def test_fuzz_100_continue_still_comes_once_the_head_is_whole(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=3) as sock:
        sock.sendall(b"POST /raw/v1/x HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n")
        time.sleep(0.05)
        sock.sendall(b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\n")
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    (seen,) = records(clean)
    assert seen.body == b"hello"


def test_fuzz_garbage_after_a_head_request_gets_a_whole_400(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    """A HEAD, then bytes that are no request: their 400 went out as a head alone (llhttp
    still reported the HEAD's method), so its announced body never came."""
    wire = request().replace(b"GET", b"HEAD") + b"\x01junk\r\n\r\n"
    (head_answer, junk_answer) = exchange(gateway, wire, ("HEAD", "GET"))
    assert head_answer[0].status_code == 200 and head_answer[1] == b""
    assert junk_answer[0].status_code == 400
    assert envelope(junk_answer[1])["code"] == "invalid_request"


def test_fuzz_head_with_a_bad_target_is_still_answered_with_a_head_alone(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=3) as sock:
        sock.sendall(request(target="raw:443").replace(b"GET", b"HEAD"))
        answer = b""
        while data := sock.recv(65536):  # the gateway closes after it
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Length: " in head
    assert body == b""
    assert records(clean) == []


@pytest.mark.parametrize(
    ("second", "status"),
    [
        (b"Expect: something-else\r\n", 417),
        (b"Content-Length: 99999999\r\n", 413),
        (b"Host: u\r\n", 400),
    ],
    ids=["417", "413", "two-hosts"],
)
def test_fuzz_request_refused_after_a_declined_h2c_offer_is_not_a_500(
    gateway: GatewayThread, clean: RecordingEngine, second: bytes, status: int
) -> None:
    """`Upgrade: h2c` on a bodiless request is declined (answered over HTTP/1.1); a request
    pipelined after it and refused at its head was parsed inside the handler of llhttp's
    upgrade signal, so the refusal surfaced as that signal: a 500."""
    offer = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    (first, refused) = exchange(gateway, offer + request(extra=second), ("GET", "GET"))
    assert first[0].status_code == 200
    assert refused[0].status_code == status
    envelope(refused[1])
    assert records(clean) == []


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /raw/v1/x HTTP/1.1\r\n", 400),  # no Host
        (b"GET /raw/v1/x HTTP/1.1\r\nHost: t\r\nHost: u\r\n", 400),
        (b"GET /raw/v1/x HTTP/1.1\r\nHost: a b\r\n", 400),
        (b"GET /raw/v1/x HTTP/1.1\r\nHost: t\r\nExpect: something-else\r\n", 417),
    ],
    ids=["no-host", "two-hosts", "bad-host", "expect"],
)
def test_fuzz_h2c_offer_is_checked_like_any_request(
    gateway: GatewayThread, clean: RecordingEngine, head: bytes, status: int
) -> None:
    """A request without a Host, offering h2c: the offer was declined and the request
    forwarded, every check after the Upgrade one skipped."""
    wire = head + b"X-Fuzz-Id: r0\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    ((answer, body),) = exchange(gateway, wire)
    assert answer.status_code == status
    envelope(body)
    assert records(clean) == []


def test_fuzz_h2c_offer_with_a_good_head_is_still_served(
    gateway: GatewayThread, clean: RecordingEngine
) -> None:
    wire = request(extra=b"Connection: Upgrade\r\nUpgrade: h2c\r\n")
    ((answer, _),) = exchange(gateway, wire)
    assert answer.status_code == 200
    (seen,) = records(clean)
    assert seen.header(b"upgrade") == []
