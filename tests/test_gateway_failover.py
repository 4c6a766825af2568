"""Failover before the first byte, over real sockets on 127.0.0.1.

A request whose replica refuses the connection (nothing listens), times out connecting
(a listener whose accept queue is full), or takes the connection and closes or resets it
before answering goes on to another ready replica of the deployment, each at most once,
its body sent whole again; never once a byte of the answer went to the client. The
replica that failed leaves the rotation at once (passive ejection) and comes back only
when a health check passes. `fleet_upstream_failovers_total` counts the failovers.
`Flaky` is an engine of our own that fails in the way its mode says and records what it
was sent; the healthy replica is the fake engine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import wait_until
from tests.gateway_harness import GatewayThread
from vllm_fleet.testing.harness import FakeEngine, free_port

MODEL = "org/rep"


@dataclass
class Seen:
    """One request a Flaky engine received, and what it did with it."""

    path: str
    body_bytes: int
    outcome: str  # the mode it met, or "health ok"


class Flaky:
    """A threaded HTTP/1.1 engine that fails every request the way `mode` says:

    - "close": reads the whole request, closes the connection without a byte;
    - "reset": reads the head, resets the connection (SO_LINGER 0);
    - "partial": reads the head and 64 KiB of the body, then closes (the rest unread);
    - "midstream": answers an SSE head and one event, then closes (after the first byte);
    - "ok": answers 200 with a JSON body naming itself.

    `GET /health` answers 200 when `health_ok`, else it meets the mode as well."""

    def __init__(self, mode: str, health_ok: bool = False) -> None:
        self.mode = mode
        self.health_ok = health_ok
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def requests(self) -> list[Seen]:
        """The requests that were not health checks."""
        with self.lock:
            return [s for s in self.seen if s.path != "/health"]

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.connections += 1
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                mode = self.mode
                if path == "/health" and self.health_ok:
                    mode = "health ok"
                if mode == "reset":
                    self._record(path, len(data), mode)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if mode == "partial":
                    while len(data) < min(length, 65536):
                        data += conn.recv(65536)
                    self._record(path, len(data), mode)
                    return  # closed with the rest of the body unread
                while len(data) < length:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        return
                    data += chunk
                body, data = data[:length], data[length:]
                self._record(path, len(body), mode)
                if mode == "close":
                    return
                if mode == "midstream":
                    event = b'data: {"choices": [{"text": "tok0", "index": 0}]}\n\n'
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
                    )
                    return
                answer = b"" if mode == "health ok" else json.dumps({"engine": "flaky"}).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )

    def _record(self, path: str, body_bytes: int, outcome: str) -> None:
        with self.lock:
            self.seen.append(Seen(path, body_bytes, outcome))


class Blackhole:
    """A listener whose accept queue is full: a connection to it hangs until it times out."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.filler = socket.create_connection(("127.0.0.1", self.port))  # the one place

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


@pytest.fixture(scope="module")
def good() -> Iterator[FakeEngine]:
    with FakeEngine(MODEL, [MODEL, "rep"]) as started:
        yield started


def fleet(deployments: dict[str, list[str]], settings: str = "") -> str:
    text = f"gateway:\n  connect_timeout: 0.5\n  max_body_mb: 32\n{settings}deployments:\n"
    for dep_id, urls in deployments.items():
        text += f"  {dep_id}:\n    model: {MODEL}\n    endpoints: {json.dumps(urls)}\n"
    return text


def good_requests(engine: FakeEngine) -> int:
    count: int = httpx.get(f"{engine.url}/fake/stats").json()["requests"]
    return count


def metric(gw: GatewayThread, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}{{{wanted}}}")


def upstream_status(gw: GatewayThread, name: str) -> dict[str, Any]:
    status = httpx.get(f"{gw.url}/fleet/status").json()
    for dep in status["deployments"].values():
        for up in dep["upstreams"]:
            if up["name"] == name:
                return dict(up)
    raise AssertionError(name)


def sdk(gw: GatewayThread, dep_id: str = "rep") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/{dep_id}/v1", api_key="-", max_retries=0)


@contextlib.contextmanager
def failing(kind: str) -> Iterator[tuple[str, Flaky | None]]:
    """A replica that fails in the way `kind` says: its URL, and the Flaky engine when
    there is one to ask what it saw."""
    if kind == "refused":
        yield f"http://127.0.0.1:{free_port()}", None
    elif kind == "connect-timeout":
        hole = Blackhole()
        try:
            yield hole.url, None
        finally:
            hole.close()
    else:
        flaky = Flaky(kind)
        try:
            yield flaky.url, flaky
        finally:
            flaky.close()


# ---------------------------------------------------------------- each failure fails over


@pytest.mark.parametrize("kind", ["refused", "connect-timeout", "close", "reset"])
def test_a_failure_before_the_first_byte_goes_to_the_healthy_replica(
    good: FakeEngine, kind: str
) -> None:
    with failing(kind) as (bad_url, flaky):
        gw = GatewayThread(fleet({"rep": [bad_url, good.url]})).start()
        try:
            before = good_requests(good)
            for _ in range(4):  # ties rotate: the failing replica is picked first once
                reply = sdk(gw).completions.create(model="x", prompt="hello", max_tokens=2)
                assert reply.system_fingerprint == f"fake-{good.port}"
            assert good_requests(good) == before + 4
            if flaky is not None:  # it was sent the request once, then left the rotation
                assert [s.outcome for s in flaky.requests()] == [kind]
            assert (
                metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-0")
                == 1
            )
            assert (
                metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-1")
                == 0
            )
            assert metric(gw, "fleet_upstream_ejected", deployment="rep", upstream="rep-0") == 1
            assert metric(gw, "fleet_upstream_ejected", deployment="rep", upstream="rep-1") == 0
            bad = upstream_status(gw, "rep-0")
            assert bad["state"] == "ready" and bad["ejected"], bad
            assert upstream_status(gw, "rep-1")["ejected"] is None
            assert (
                metric(gw, "fleet_requests_total", deployment="rep", style="path", status="200")
                == 4
            )
        finally:
            gw.stop()


def test_a_large_body_sent_in_pieces_goes_whole_to_the_next_replica(good: FakeEngine) -> None:
    """The first replica reads 64 KiB of an 8 MiB body and closes: the gateway was still
    writing it. The body is in memory (a request is relayed once it is whole), so the
    next replica gets all of it."""
    flaky = Flaky("partial")
    gw = GatewayThread(fleet({"rep": [flaky.url, good.url]})).start()
    prompt = "y" * (8 << 20)
    try:
        for _ in range(2):
            answer = httpx.post(
                f"{gw.url}/rep/v1/completions",
                json={"prompt": prompt, "max_tokens": 1},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Fleet-Upstream"] == "rep-1"
            seen = httpx.get(f"{good.url}/fake/stats", timeout=60).json()["last_request"]
            assert seen["body"]["prompt"] == prompt
        (sent,) = flaky.requests()
        assert sent.outcome == "partial" and 65536 <= sent.body_bytes < len(prompt) // 4
        assert metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-0") == 1
    finally:
        gw.stop()
        flaky.close()


# ---------------------------------------------------------------- never after the first byte


def test_a_stream_broken_after_its_first_byte_is_not_retried(good: FakeEngine) -> None:
    flaky = Flaky("midstream")
    gw = GatewayThread(fleet({"rep": [flaky.url, good.url]})).start()
    try:
        body = {"prompt": "x", "max_tokens": 3, "stream": True}
        broken: list[str] = []
        for _ in range(2):  # ties rotate: one of the two lands on the flaky replica
            before = good_requests(good)
            with httpx.stream("POST", f"{gw.url}/rep/v1/completions", json=body) as answer:
                lines = [line for line in answer.iter_lines() if line]
            assert answer.status_code == 200
            assert lines[-1] == "data: [DONE]"
            if answer.headers["X-Fleet-Upstream"] == "rep-0":
                broken = lines
                assert good_requests(good) == before  # not sent again to the healthy one
        assert broken, "no request reached the flaky replica"
        assert broken[0] == 'data: {"choices": [{"text": "tok0", "index": 0}]}'
        error = json.loads(broken[-2].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_disconnected" and "rep-0" in error["message"]
        assert len(flaky.requests()) == 1
        assert upstream_status(gw, "rep-0")["ejected"] is None  # answering: not ejected
        assert metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-0") == 0
    finally:
        gw.stop()
        flaky.close()


# ---------------------------------------------------------------- every replica failing


def test_every_replica_failing_is_tried_once_then_a_502_naming_the_deployment() -> None:
    closing, resetting = Flaky("close"), Flaky("reset")
    refused = f"http://127.0.0.1:{free_port()}"
    gw = GatewayThread(fleet({"mixed": [closing.url, resetting.url, refused]})).start()
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            sdk(gw, "mixed").completions.create(model="x", prompt="hello")
        assert caught.value.status_code == 502
        error = caught.value.response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "upstream_error"
        assert caught.value.response.headers["X-Fleet-Error"] == "gateway"
        for word in ("`mixed`", "mixed-0", "mixed-1", "mixed-2"):
            assert word in error["message"], error["message"]
        # Each failure said in words, never as Python's class name.
        assert "closed the connection" in error["message"], error["message"]
        assert "reset the connection" in error["message"], error["message"]
        assert "Error" not in error["message"], error["message"]
        assert len(closing.requests()) == 1 and len(resetting.requests()) == 1
        # All three are out of the rotation now: answered at once, naming them.
        again = httpx.post(f"{gw.url}/mixed/v1/completions", json={"prompt": "x"})
        assert again.status_code == 503 and int(again.headers["Retry-After"]) > 0
        message = again.json()["error"]["message"]
        assert "`mixed`" in message and "health check" in message, message
        assert len(closing.requests()) == 1 and len(resetting.requests()) == 1
        counted = [
            metric(gw, "fleet_upstream_failovers_total", deployment="mixed", upstream=f"mixed-{i}")
            for i in range(3)
        ]
        assert sorted(counted) == [0, 1, 1]  # moved on from the first two tried, not the last
    finally:
        gw.stop()
        closing.close()
        resetting.close()


def test_every_replica_refusing_is_a_503_with_retry_after_naming_the_deployment() -> None:
    hole = Blackhole()
    refused = f"http://127.0.0.1:{free_port()}"
    gw = GatewayThread(fleet({"gone": [hole.url, refused]})).start()
    try:
        answer = httpx.post(f"{gw.url}/gone/v1/completions", json={"prompt": "x"}, timeout=30)
        assert answer.status_code == 503 and int(answer.headers["Retry-After"]) > 0
        error = answer.json()["error"]
        assert error["code"] == "upstream_unreachable"
        for word in ("`gone`", "accepts connections", "gone-0", "gone-1", "0.5 s"):
            assert word in error["message"], error["message"]
    finally:
        gw.stop()
        hole.close()


# ---------------------------------------------------------------- back after a health check


def test_an_ejected_replica_gets_no_traffic_until_a_health_check_passes(good: FakeEngine) -> None:
    flaky = Flaky("ok", health_ok=True)
    gw = GatewayThread(
        fleet({"rep": [flaky.url, good.url]}) + "engines:\n  health_interval: 0.5\n",
        probes=True,
    ).start()

    def answered_by() -> str:
        answer = httpx.post(f"{gw.url}/rep/v1/completions", json={"prompt": "x"})
        assert answer.status_code == 200, answer.text
        return str(answer.headers["X-Fleet-Upstream"])

    def drops() -> int:
        return sum(1 for s in flaky.requests() if s.outcome == "close")

    try:
        wait_until(lambda: answered_by() == "rep-0", what="the replica in the rotation")
        flaky.mode, flaky.health_ok = "close", False  # it breaks: requests and checks fail
        wait_until(lambda: answered_by() == "rep-1" and drops() > 0, what="a request dropped")
        # (Dropped on the pooled connection, then once more on a fresh one: a pooled
        # connection closed unanswered may be the engine's idle close.)
        dropped = drops()
        assert dropped <= 2
        for _ in range(10):
            assert answered_by() == "rep-1"
        assert drops() == dropped  # out of the rotation since, while its checks fail
        assert upstream_status(gw, "rep-0")["ejected"]
        flaky.mode, flaky.health_ok = "ok", True  # it recovers: its next check passes
        wait_until(lambda: answered_by() == "rep-0", what="traffic to the replica again")
        assert upstream_status(gw, "rep-0")["ejected"] is None
        assert metric(gw, "fleet_upstream_ejected", deployment="rep", upstream="rep-0") == 0
        assert metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-0") == 1
    finally:
        gw.stop()
        flaky.close()


def test_only_a_health_check_after_the_failure_brings_a_replica_back(good: FakeEngine) -> None:
    """A replica whose /health passes while it drops every request: each request it
    drops ejects it, and it is tried again only after a health check that reached it
    after that failure (never on a timer, never on an older check)."""
    flaky = Flaky("close", health_ok=True)
    gw = GatewayThread(
        fleet({"rep": [flaky.url, good.url]}) + "engines:\n  health_interval: 0.05\n",
        probes=True,
    ).start()
    try:

        def dropped_three_times() -> bool:
            answer = httpx.post(f"{gw.url}/rep/v1/completions", json={"prompt": "x"})
            assert answer.status_code == 200, answer.text  # every drop failed over
            assert answer.headers["X-Fleet-Upstream"] == "rep-1"
            return len(flaky.requests()) >= 3

        wait_until(dropped_three_times, what="three drops, each after a readmission")
        with flaky.lock:
            seen = list(flaky.seen)
        drops = [i for i, s in enumerate(seen) if s.path != "/health"]
        for first, second in itertools.pairwise(drops):
            between = seen[first + 1 : second]
            assert any(s.outcome == "health ok" for s in between), seen
        failovers = metric(gw, "fleet_upstream_failovers_total", deployment="rep", upstream="rep-0")
        assert failovers == len(flaky.requests())
    finally:
        gw.stop()
        flaky.close()


def test_the_gateways_own_lack_of_open_files_ejects_no_replica(good: FakeEngine) -> None:
    """A connection that fails for want of a file descriptor here (EMFILE) is no fault of
    the engine: the request is answered 503, and the replica stays in the rotation."""
    gw = GatewayThread(fleet({"rep": [good.url]})).start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            wait_until(lambda: gw.connection_count() == 1, what="the connection accepted")
            # No descriptor left: the limit at the highest open one, every gap filled.
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))), hard)
            )
            fillers = []
            try:
                with contextlib.suppress(OSError):
                    while True:
                        fillers.append(os.open(os.devnull, os.O_RDONLY))
                sock.sendall(
                    b"POST /rep/v1/completions HTTP/1.1\r\nHost: t\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                )
                answer = sock.recv(65536)
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Too many open files" in answer
        assert upstream_status(gw, "rep-0")["ejected"] is None
        reply = sdk(gw).completions.create(model="x", prompt="hello", max_tokens=1)
        assert reply.system_fingerprint == f"fake-{good.port}"
    finally:
        gw.stop()
