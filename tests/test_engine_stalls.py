"""Stall detection with real processes: a fake engine that hangs as vLLM does when its
engine core deadlocks (/health keeps answering 200, requests get no token) is found
stalled, taken out of the rotation, restarted, and says why; engines without vLLM's
metrics are left to their health check."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake_fleet_file, pid_alive, wait_until
from tests.test_fleet_up import FleetUp
from tests.test_supervisor import make_supervisor, only, run, until
from vllm_fleet.registry import State
from vllm_fleet.testing.harness import engine_request

# Tokens flow (100 a second) until the engine hangs: a slow stream, not a stalled one.
STREAMING = ["--token-delay", "0.01", "--tokens", "100000"]


def open_stream(url: str) -> socket.socket:
    """A streamed completion left running on the engine at `url` (the caller closes it):
    `unix:/path` (its socket) or `http://127.0.0.1:port`."""
    payload = json.dumps({"prompt": "x", "stream": True}).encode()
    if url.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(url.removeprefix("unix:"))
    else:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    return sock


def post(url: str, path: str) -> None:
    status, _ = engine_request(url, path, "POST", b"", timeout=5)
    assert status == 200


async def apost(url: str, path: str) -> None:
    await asyncio.to_thread(post, url, path)


def test_a_hung_engine_is_marked_stalled_and_restarted_with_its_reason(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"m": {"model": "org/m", "args": STREAMING, "stall_timeout": 1}},
        engines={"health_interval": 0.1},
    )
    sup, registry, events = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="engine ready")
            old_pid = up.pid
            assert old_pid is not None
            stream = await asyncio.to_thread(open_stream, up.url)
            try:
                # Busy for longer than stall_timeout, but tokens move: not a stall.
                await asyncio.sleep(1.5)
                assert (up.state, up.restarts, up.stalls) == (State.READY, 0, 0)
                await apost(up.url, "/fake/hang")
                await until(lambda: up.state is State.STALLED, timeout=5, what="stalled")
                assert up.message.startswith("stalled: 1 request(s) running and 0 waiting")
                await until(
                    lambda: up.state is State.READY and up.restarts == 1,
                    what="restarted and ready again",
                )
            finally:
                stream.close()
            assert up.pid != old_pid and not pid_alive(old_pid)
            assert up.stalls == 1
            assert up.last_failure.startswith("stalled: 1 request(s) running and 0 waiting, ")
            assert "no token computed for 1s (stall_timeout 1s)" in up.last_failure
            snap = registry.snapshot()["deployments"]["m"]["upstreams"][0]
            assert (snap["stalls"], snap["last_failure"]) == (1, up.last_failure)
        finally:
            await sup.stop()

    run(body)
    states = [e.state for e in events]
    stalled_at = states.index(State.STALLED)
    assert states[stalled_at - 1 : stalled_at + 1] == [State.READY, State.STALLED]
    restart = events[stalled_at + 1]  # straight to the restart, through the same backoff
    assert restart.state is State.STARTING
    assert restart.message.startswith("stalled: 1 request(s) running")
    assert "restarting in 0.1s (restart 1 of at most 5 in a row)" in restart.message
    log = (tmp_path / "logs" / "m-0.log").read_text()
    assert "---- vllm-fleet: m-0 at " in log and ": stopping it: stalled: 1 request(s)" in log


# Answers /health with 200 and everything else (so /metrics) with 404: an engine the
# fleet was told to watch (`stall_timeout` on its deployment) that has no vLLM metrics.
NO_METRICS = textwrap.dedent(
    """
    import http.server, sys
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


@pytest.mark.parametrize("kind", ["not-vllm-command", "no-vllm-metrics"])
def test_an_engine_without_vllm_metrics_is_left_to_its_health_check(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "not-vllm-command":
        # The fake engine's command is not vLLM's: the plan does not watch it at all, so
        # even hung with a request in flight it stays in (only /health could take it out).
        deployment: dict[str, Any] = {"model": "org/m", "args": STREAMING}
    else:
        script = tmp_path / "no_metrics.py"
        script.write_text(NO_METRICS)
        deployment = {
            "model": "x",
            "command": ["{python}", str(script), "{port}"],
            "listen": "tcp",
            "stall_timeout": 0.3,
        }
    path = fake_fleet_file(
        tmp_path, {"m": deployment}, engines={"health_interval": 0.1, "stall_timeout": 0.3}
    )
    sup, registry, _ = make_supervisor(path)
    up = only(registry)
    assert (up.spec.stall_timeout is None) == (kind == "not-vllm-command")  # type: ignore[union-attr]

    async def body() -> None:
        await sup.start()
        try:
            await until(lambda: up.state is State.READY, what="engine ready")
            pid = up.pid
            if kind == "not-vllm-command":
                stream = await asyncio.to_thread(open_stream, up.url)
                await apost(up.url, "/fake/hang")
            await asyncio.sleep(1.5)  # five times the stall timeout
            if kind == "not-vllm-command":
                stream.close()
            assert (up.state, up.pid, up.restarts, up.stalls) == (State.READY, pid, 0, 0)
        finally:
            await sup.stop()

    with caplog.at_level(logging.WARNING, logger="vllm_fleet.engines.process"):
        run(body)
    said = [r.getMessage() for r in caplog.records if "left to its health check" in r.message]
    if kind == "no-vllm-metrics":
        assert said == [
            "m-0: no vLLM metrics: /metrics answered 404; left to its health check"
        ]  # once, not every interval
    else:
        assert said == []


def test_fleet_up_routes_around_a_stalled_replica_and_shows_why_it_restarted(
    tmp_path: Path,
) -> None:
    # --startup-delay keeps the restarted replica loading a while: long enough to see
    # every request go to the other one.
    args = [*STREAMING, "--startup-delay", "2"]
    path = fake_fleet_file(
        tmp_path,
        {"d": {"model": "org/d", "replicas": 2, "args": args, "stall_timeout": 1}},
        engines={"health_interval": 0.1, "start_timeout": 30},
    )
    fleet = FleetUp(path)
    try:
        ups = {u["name"]: u for u in fleet.wait_ready(2)}
        stuck = ups["d-0"]
        stream = open_stream(stuck["url"])
        try:
            post(stuck["url"], "/fake/hang")

            def state_of_d0() -> dict[str, Any] | None:
                now = {u["name"]: u for u in fleet.upstreams()}.get("d-0")
                return now if now and now["state"] != "ready" else None

            out = wait_until(state_of_d0, timeout=10, what="d-0 out of the rotation")
            assert out["state"] in ("stalled", "stopping", "stopped", "starting")
        finally:
            stream.close()
        # Out of the rotation: every request goes to d-1 until d-0 is ready again.
        for _ in range(6):
            request = urllib.request.Request(
                f"{fleet.url}/d/v1/completions",
                data=json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.headers["X-Fake-Engine"] == "org/d:d-1"  # d-1.sock
        assert {u["name"]: u["state"] for u in fleet.upstreams()}["d-0"] != "ready"

        def d0_back() -> dict[str, Any] | None:
            now = {u["name"]: u for u in fleet.upstreams()}["d-0"]
            return now if now["state"] == "ready" and now["restarts"] == 1 else None

        back = wait_until(d0_back, timeout=20, what="d-0 restarted and ready")
        assert back["pid"] != stuck["pid"] and back["stalls"] == 1
        assert back["last_failure"].startswith("stalled: 1 request(s) running and 0 waiting")

        # `fleet status` says why it restarted; /metrics counts the stall.
        shown = subprocess.run(
            [sys.executable, "-m", "vllm_fleet.cli", "status", "--url", fleet.url],
            capture_output=True,
            text=True,
            timeout=30,
            env={"COLUMNS": "200", "NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
            check=True,
        ).stdout
        assert "d-0: ready; last restarted after: stalled: 1 request(s) running" in shown
        with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=5) as resp:
            page = resp.read().decode()
        assert 'fleet_engine_stalls_total{deployment="d",upstream="d-0"} 1.0' in page
        assert 'fleet_engine_stalls_total{deployment="d",upstream="d-1"} 0.0' in page
        # The log of `fleet up` said it as it happened.
        wait_until(lambda: "d-0 stalled: 1 request(s) running" in fleet.text(), what="said")
    finally:
        assert fleet.stop() == 0, fleet.text()


# A vLLM-like engine whose /metrics page arrives in two pieces, as a busy engine sends
# it: one request running and a token counter that never moves (stalled).
DRIBBLED_METRICS = textwrap.dedent(
    """
    import http.server, sys, time
    PAGE = (
        "# HELP vllm:num_requests_running x\\n# TYPE vllm:num_requests_running gauge\\n"
        + "# padding\\n" * 2000
        + "vllm:num_requests_running{model_name=\\"x\\"} 1.0\\n"
        "vllm:num_requests_waiting{model_name=\\"x\\"} 0.0\\n"
        "vllm:generation_tokens_total{model_name=\\"x\\"} 5.0\\n"
        "vllm:prompt_tokens_total{model_name=\\"x\\"} 5.0\\n"
    ).encode()
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            if self.path != "/metrics":
                self.send_response(200); self.send_header("Content-Length", "0")
                self.end_headers(); return
            self.send_response(200); self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers(); self.wfile.write(PAGE[:100]); self.wfile.flush()
            time.sleep(0.05); self.wfile.write(PAGE[100:])
        def log_message(self, *args):
            pass
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def test_a_metrics_page_that_arrives_in_pieces_is_read_whole(tmp_path: Path) -> None:
    script = tmp_path / "dribbled.py"
    script.write_text(DRIBBLED_METRICS)
    deployment = {
        "model": "x",
        "command": ["{python}", str(script), "{port}"],
        "listen": "tcp",
        "stall_timeout": 0.5,
    }
    path = fake_fleet_file(tmp_path, {"m": deployment}, engines={"health_interval": 0.1})
    sup, registry, _ = make_supervisor(path)
    up = only(registry)

    async def body() -> None:
        await sup.start()
        try:
            # Found stalled, then stopped and its failure noted (before it restarts).
            await until(
                lambda: up.stalls >= 1 and bool(up.last_failure),
                what="the engine found stalled",
                timeout=15,
            )
        finally:
            await sup.stop()

    run(body)
    assert "busy" in up.last_failure or "stalled" in up.last_failure, up.last_failure
