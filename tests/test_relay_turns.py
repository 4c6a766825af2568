"""The fast server starts at most DISPATCH_PER_TURN requests per turn of the event loop;
the rest wait, in arrival order, for the next turns (engines' answers are relayed in
between). Unit tests of the turn-taking, then a burst over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest
import uvloop

from tests.gateway_harness import GatewayThread
from tests.test_gateway_wire import Reader, post
from vllm_fleet.config import loads
from vllm_fleet.gateway.relay.server import DISPATCH_PER_TURN, FastServer
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


async def started_server() -> FastServer:
    config = loads(f"deployments:\n  t:\n    model: {MODEL}\n")
    server = FastServer(config, Registry(config, build_plan(config, Inventory(None, ""), "py")))
    await server.start("127.0.0.1", 0)
    return server


def test_light_load_starts_each_request_at_once() -> None:
    async def main() -> None:
        server = await started_server()
        log: list[str] = []
        for turn in range(3):
            assert server.admit(Stub(f"{turn}", log))
            await asyncio.sleep(0)
        assert log == []  # nothing was queued: every request started inline
        await server.close(0)

    run(main())


def test_requests_over_the_budget_wait_their_turn_in_arrival_order() -> None:
    async def main() -> None:
        server = await started_server()
        log: list[str] = []
        stubs = [Stub(f"c{i}", log) for i in range(DISPATCH_PER_TURN * 2 + 3)]
        admitted = [server.admit(s) for s in stubs]
        assert admitted == [True] * DISPATCH_PER_TURN + [False] * (DISPATCH_PER_TURN + 3)
        assert all(s.waiting for s in stubs[DISPATCH_PER_TURN:])
        stubs[DISPATCH_PER_TURN + 1].closed = True  # left while waiting: skipped
        late = Stub("late", log)
        assert not server.admit(late)  # behind those waiting
        await asyncio.sleep(0)  # one turn: a full budget, spent on the first waiting
        expected = [s.name for s in stubs[DISPATCH_PER_TURN:] if not s.closed]
        assert log == expected[:DISPATCH_PER_TURN]
        await asyncio.sleep(0)  # the next turn: the rest, then the late one
        assert log == [*expected, "late"]
        assert not any(s.waiting for s in [*stubs, late])
        await server.close(0)

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
        gw = GatewayThread(fleet, "fast").start()
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
