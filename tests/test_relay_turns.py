"""How the gateway paces work: at most DISPATCH_PER_TURN requests start per turn of
the event loop, the rest wait in arrival order for the next turns (engines' answers are
relayed in between); and a connection stops reading while the requests it pipelined
hold more than MAX_QUEUED_BYTES of body. Unit tests, then a burst over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Iterator

import pytest
import uvloop

from tests.conftest import wait_until
from tests.gateway_harness import GatewayThread
from tests.test_gateway_wire import Reader, post
from vllm_fleet.config import loads
from vllm_fleet.gateway.relay import client as client_module
from vllm_fleet.gateway.relay.admission import DISPATCH_PER_TURN, Admission
from vllm_fleet.gateway.relay.client import MAX_QUEUED_BYTES, ClientConnection
from vllm_fleet.gateway.relay.server import RelayServer, connection_limit
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry
from vllm_fleet.testing.harness import FakeEngine

MODEL = "org/turns"


class Stub:
    """Stands for a client connection whose next request is complete."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.waiting = False
        self.closed = False

    def dispatch_next(self) -> None:
        self.log.append(self.name)


def run(test: object) -> None:
    uvloop.run(test)


def test_light_load_starts_each_request_at_once() -> None:
    async def main() -> None:
        admission = Admission()
        log: list[str] = []
        for turn in range(3):
            assert admission.admit(Stub(f"{turn}", log))
            await asyncio.sleep(0)
        assert log == []  # nothing was queued: every request started inline

    run(main())


def test_requests_over_the_budget_wait_their_turn_in_arrival_order() -> None:
    async def main() -> None:
        admission = Admission()
        log: list[str] = []
        stubs = [Stub(f"c{i}", log) for i in range(DISPATCH_PER_TURN * 2 + 3)]
        admitted = [admission.admit(s) for s in stubs]
        assert admitted == [True] * DISPATCH_PER_TURN + [False] * (DISPATCH_PER_TURN + 3)
        assert all(s.waiting for s in stubs[DISPATCH_PER_TURN:])
        stubs[DISPATCH_PER_TURN + 1].closed = True  # left while waiting: skipped
        late = Stub("late", log)
        assert not admission.admit(late)  # behind those waiting
        await asyncio.sleep(0)  # one turn: a full budget, spent on the first waiting
        expected = [s.name for s in stubs[DISPATCH_PER_TURN:] if not s.closed]
        assert log == expected[:DISPATCH_PER_TURN]
        await asyncio.sleep(0)  # the next turn: the rest, then the late one
        assert log == [*expected, "late"]
        assert not any(s.waiting for s in [*stubs, late])
        assert admission.waiting_count == 0

    run(main())


def words(count: int) -> str:
    return " ".join(f"tok{t}" for t in range(count))


def streamed_text(body: bytes) -> str:
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayThread]:
    with FakeEngine(MODEL, [MODEL, "turns"], "--token-delay", "0.001") as engine:
        fleet = f"""
deployments:
  turns:
    model: {MODEL}
    endpoints: ["{engine.url}"]
"""
        gw = GatewayThread(fleet).start()
        yield gw
        gw.stop()


def test_a_burst_over_many_turns_is_answered_whole_and_in_order(gateway: GatewayThread) -> None:
    clients = DISPATCH_PER_TURN * 6
    socks = [
        socket.create_connection(("127.0.0.1", gateway.port), timeout=20) for _ in range(clients)
    ]
    try:
        for i, sock in enumerate(socks):  # every request sent before any answer is read
            sock.sendall(
                post(
                    "/turns/v1/completions",
                    {"prompt": "x", "max_tokens": 2 + i % 3, "stream": True},
                )
                + post("/turns/v1/completions", {"prompt": "x", "max_tokens": 1 + i % 4})
            )
        for i, sock in enumerate(socks):
            stream, plain = Reader(sock).read(2)
            assert stream.status == 200 and stream.body.endswith(b"data: [DONE]\n\n")
            assert streamed_text(stream.body) == words(2 + i % 3)
            text = json.loads(plain.body)["choices"][0]["text"]
            assert plain.status == 200 and text == words(1 + i % 4)
    finally:
        for sock in socks:
            sock.close()


class FakeTransport:
    """A client's transport as the connection sees it: what it was sent, and whether
    reading is paused."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


def test_pipelined_big_bodies_stop_the_reading_until_answered() -> None:
    async def main() -> None:
        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Answers each request once its body is in, like any engine.
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

        listener = await asyncio.start_server(engine, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        config = loads(
            f"gateway:\n  max_body_mb: 2\ndeployments:\n  t:\n    model: {MODEL}\n"
            f'    endpoints: ["http://127.0.0.1:{port}"]\n'
        )
        server = RelayServer(
            config, Registry(config, build_plan(config, Inventory(None, ""), "py"))
        )
        await server.start("127.0.0.1", 0)
        conn = ClientConnection(server.state, server.pools, server.admission)
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        big = post("/t/v1/completions", {"prompt": "x" * (MAX_QUEUED_BYTES // 2)})
        # Read in one go, as from one socket read: the first is sent to the engine, the
        # big ones wait behind it.
        conn.data_received(post("/t/v1/completions", {"prompt": "first"}) + big)
        assert not transport.paused  # one big body behind the first: within the bound
        conn.data_received(big)
        assert transport.paused  # two: over it, nothing more is read for now
        await wait_for(lambda: transport.sent.count(b"HTTP/1.1 200") == 3)
        assert not transport.paused  # all answered: reading again
        assert conn.queued_bytes == 0
        await server.close(0)
        listener.close()

    run(main())


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_connections_past_max_connections_get_a_503_and_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(client_module, "OVER_LIMIT_GRACE", 0.3)
    with FakeEngine(MODEL, [MODEL, "turns"]) as engine:
        fleet = f"""
gateway:
  max_connections: 3
deployments:
  turns:
    model: {MODEL}
    endpoints: ["{engine.url}"]
"""
        gw = GatewayThread(fleet).start()
        try:
            held = [socket.create_connection(("127.0.0.1", gw.port), timeout=5) for _ in range(3)]
            over = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            over.sendall(post("/turns/v1/completions", {"prompt": "x", "max_tokens": 1}))
            reader = Reader(over)
            (answer,) = reader.read()
            assert answer.status == 503 and answer.headers["retry-after"] == "1"
            assert json.loads(answer.body)["error"]["code"] == "too_many_connections"
            assert reader.closes() and over.recv(1) == b""
            # An upload over the limit is refused at its head, its body never read.
            upload = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            upload.sendall(
                b"POST /turns/v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 30000000\r\nExpect: 100-continue\r\n\r\n"
            )
            (refused,) = Reader(upload).read()
            assert refused.status == 503 and refused.headers["connection"] == "close"
            upload.close()
            silent = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            assert silent.recv(1) == b""  # sent nothing: closed after the grace period
            # The connections within the limit are served as ever.
            held[0].sendall(post("/turns/v1/completions", {"prompt": "x", "max_tokens": 1}))
            assert Reader(held[0]).read()[0].status == 200
            held[1].close()

            def served() -> bool:  # the freed place is taken by the next connection
                with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as again:
                    again.sendall(post("/turns/v1/completions", {"prompt": "x", "max_tokens": 1}))
                    return Reader(again).read()[0].status == 200

            wait_until(served, timeout=10, what="the freed place served")
        finally:
            for sock in [*held, over, silent]:
                sock.close()
            gw.stop()


def test_metrics_show_connections_their_limit_and_requests_waiting(
    gateway: GatewayThread,
) -> None:
    idle = [socket.create_connection(("127.0.0.1", gateway.port), timeout=5) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            (answer,) = Reader(sock).read()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in answer.body.decode().splitlines()
            if line.startswith("fleet_")
        }
        assert values["fleet_client_connections"] >= 3  # the two idle ones and this one
        assert values["fleet_client_connections_limit"] == connection_limit(None)
        assert values["fleet_requests_waiting"] == 0
    finally:
        for sock in idle:
            sock.close()
