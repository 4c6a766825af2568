"""The real `fleet up` as a subprocess, with fake engines: it serves, restarts, and leaves
no process behind however it is stopped."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import fake_fleet_file, pid_alive, wait_until
from vllm_fleet.testing.harness import engine_json


class FleetUp:
    """`python -m vllm_fleet.cli up FILE` with its output in a file."""

    def __init__(self, path: Path, *args: str, open_files: tuple[int, int] | None = None) -> None:
        self.path = path
        self.output = path.parent / "fleet-up.out"
        self.gateway_port = yaml.safe_load(path.read_text())["gateway"]["port"]

        def limit() -> None:  # in the child: the open-files limit it starts with
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_fleet.cli", "up", str(path), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=limit if open_files is not None else None,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.url}/fleet/status", timeout=2) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except OSError:
            return None

    def status_with_key(self, key: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/fleet/status", headers={"Authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except OSError:
            return {}

    def upstreams(self) -> list[dict[str, Any]]:
        data = self.status() or {"deployments": {}}
        return [u for dep in data["deployments"].values() for u in dep["upstreams"]]

    def wait_ready(self, count: int) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            assert self.proc.poll() is None, self.text()
            ups = self.upstreams()
            ok = len(ups) == count and all(u["state"] == "ready" for u in ups)
            return ups if ok else None

        result: list[dict[str, Any]] = wait_until(ready, timeout=20, what="engines ready")
        return result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def fleets() -> Iterator[list[FleetUp]]:
    started: list[FleetUp] = []
    yield started
    for fleet in started:  # a failed test must not leave a fleet running
        if fleet.proc.poll() is None:
            fleet.proc.send_signal(signal.SIGTERM)
            try:
                fleet.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                fleet.proc.kill()
                fleet.proc.wait()


def test_fleet_up_serves_restarts_and_sigterm_leaves_no_process(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {
            "qwen": {"model": "Qwen/Qwen2.5-1.5B-Instruct", "gpus": [1]},
            "smol": {"model": "org/smol", "gpus": [0, 2]},
        },
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    ups = {u["name"]: u for u in fleet.wait_ready(2)}
    wait_until(lambda: "ready: http://127.0.0.1:" in fleet.text(), what="the ready line")

    # Each engine saw its own GPUs.
    for name, gpus in (("qwen-0", "1"), ("smol-0", "0,2")):
        env = engine_json(ups[name]["url"], "/fake/env")
        assert env["CUDA_VISIBLE_DEVICES"] == gpus
        assert env["pid"] == ups[name]["pid"]
    # Requests go through the gateway to the engine.
    health = urllib.request.urlopen(f"{fleet.url}/qwen/health", timeout=5)
    assert health.status == 200

    # An engine killed outright is restarted, with a new pid.
    old = ups["qwen-0"]["pid"]
    os.kill(old, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        (up,) = [u for u in fleet.upstreams() if u["name"] == "qwen-0"]
        return up if up["state"] == "ready" and up["restarts"] == 1 else None

    new = wait_until(restarted, timeout=15, what="qwen-0 restarted")
    assert new["pid"] != old

    # `fleet status` reads the address from the fleet file and shows every engine.
    shown = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "status", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "qwen-0" in shown.stdout and "smol-0" in shown.stdout
    assert "ready" in shown.stdout

    pids = [u["pid"] for u in fleet.upstreams()]
    assert fleet.stop() == 0
    assert not any(pid_alive(pid) for pid in pids)
    out = fleet.text()
    assert f"{fleet.url}/qwen/v1" in out  # the URL styles follow the ready line
    assert "Traceback" not in out


def test_sigterm_while_engines_load_leaves_no_process(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    slow = ["--startup-delay", "30"]
    path = fake_fleet_file(
        tmp_path,
        {"a": {"model": "org/a", "args": slow}, "b": {"model": "org/b", "args": slow}},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)

    def spawned() -> list[int] | None:
        assert fleet.proc.poll() is None, fleet.text()
        ups = fleet.upstreams()
        pids = [u["pid"] for u in ups if u["pid"] and u["state"] == "starting"]
        return pids if len(pids) == 2 else None

    pids = wait_until(spawned, timeout=15, what="both engines loading")
    assert all(pid_alive(pid) for pid in pids)
    assert fleet.stop() == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert "Traceback" not in fleet.text()


def test_engines_die_when_fleet_up_is_killed_outright(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(tmp_path, {"a": {"model": "org/a"}})
    fleet = FleetUp(path)
    fleets.append(fleet)
    pids = [u["pid"] for u in fleet.wait_ready(1)]
    assert fleet.stop(signal.SIGKILL) == -signal.SIGKILL
    # PR_SET_PDEATHSIG: the kernel kills each engine when its parent dies.
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10, what="engines gone")


def test_busy_gateway_port_exits_1_with_a_message(tmp_path: Path, fleets: list[FleetUp]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = fake_fleet_file(tmp_path, {"a": {"model": "org/a"}})
        fleet = FleetUp(path, "--port", str(port))
        fleets.append(fleet)
        assert fleet.proc.wait(timeout=20) == 1
    out = fleet.text()
    assert f"port {port} in use; set gateway.port" in out
    assert "--port" in out
    assert "Traceback" not in out
    assert not (tmp_path / "logs" / "a-0.log").exists()  # no engine was started


# Ignores SIGTERM, like an engine stuck in a CUDA call.
STUBBORN = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_a_second_signal_kills_engines_without_waiting_the_grace_period(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    path = fake_fleet_file(
        tmp_path,
        {"s": {"model": "x", "command": ["{python}", str(script), "{port}"], "listen": "tcp"}},
        engines={"stop_timeout": 600},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    pids = [u["pid"] for u in fleet.wait_ready(1)]
    fleet.proc.send_signal(signal.SIGINT)
    wait_until(lambda: "SIGINT: stopping" in fleet.text(), what="first signal seen")
    assert fleet.proc.poll() is None  # waiting out the grace period
    assert fleet.stop(signal.SIGINT) == 0
    assert "SIGINT again: SIGKILL" in fleet.text()
    assert not any(pid_alive(pid) for pid in pids)


def test_a_failed_engine_is_shown_with_the_tail_of_its_log(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"gated": {"model": "org/gated", "args": ["--fail-start"]}},
        engines={"max_restarts": 0},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: "every engine failed" in fleet.text(), what="the failure summary")
    out = fleet.text()
    assert "gated-0 failed: exited with status 1" in out
    assert f"last lines of {tmp_path / 'logs' / 'gated-0.log'}" in out
    assert "You are trying to access a gated repo" in out
    assert fleet.stop() == 0
    assert "Traceback" not in fleet.text()


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def test_the_open_files_limit_is_raised_to_the_hard_limit_for_gateway_and_engines(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 8192:
        pytest.skip(f"this machine's hard open-files limit is {hard}, below the 8192 tested")
    path = fake_fleet_file(tmp_path, {"smol": {"model": "org/smol"}})
    fleet = FleetUp(path, open_files=(256, 8192))  # a login shell's low soft limit
    fleets.append(fleet)
    (engine,) = fleet.wait_ready(1)
    assert open_files_limit(fleet.proc.pid) == (8192, 8192)
    assert open_files_limit(engine["pid"]) == (8192, 8192)  # engines inherit it
    assert "open files are allowed" not in fleet.text()
    assert fleet.stop() == 0


def test_a_low_hard_open_files_limit_is_warned_about(tmp_path: Path, fleets: list[FleetUp]) -> None:
    path = fake_fleet_file(tmp_path, {"smol": {"model": "org/smol"}})
    fleet = FleetUp(path, open_files=(256, 1024))
    fleets.append(fleet)
    fleet.wait_ready(1)
    assert open_files_limit(fleet.proc.pid) == (1024, 1024)
    assert "only 1024 open files are allowed, so about 512 streams" in " ".join(
        fleet.text().split()
    )
    assert fleet.stop() == 0


def _start_stream(url: str, tokens: int) -> tuple[socket.socket, bytes]:
    """A streamed chat request on a raw socket, returned once its first bytes came back."""
    body = json.dumps({"messages": [], "max_tokens": tokens, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    sock.sendall(
        b"POST /chat/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return sock, sock.recv(65536)


def _read_to_close(sock: socket.socket, first: bytes) -> bytes:
    data = bytearray(first)
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
            if data.endswith(b"0\r\n\r\n"):  # the last chunk: the answer is complete
                break
    return bytes(data)


def test_sigterm_lets_a_stream_in_flight_finish_before_engines_stop(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path, {"chat": {"model": "org/chat", "args": ["--token-delay", "0.02"]}}
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    (engine,) = fleet.wait_ready(1)
    sock, first = _start_stream(fleet.url, tokens=100)  # about 2 s of tokens
    fleet.proc.send_signal(signal.SIGTERM)
    answer = _read_to_close(sock, first)
    assert fleet.proc.wait(timeout=30) == 0, fleet.text()
    # Every token arrived and the stream ended as vLLM ends it, with no error event.
    assert answer.count(b'"delta": {"content":') == 100, answer[-500:]
    assert b"data: [DONE]" in answer
    assert b"upstream_disconnected" not in answer
    assert not pid_alive(engine["pid"])


def test_a_drain_timeout_cuts_a_long_stream_off_and_still_stops(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"chat": {"model": "org/chat", "args": ["--token-delay", "0.05"]}},
        engines={"drain_timeout": 0.5},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    (engine,) = fleet.wait_ready(1)
    sock, first = _start_stream(fleet.url, tokens=2000)  # 100 s of tokens: never drains
    fleet.proc.send_signal(signal.SIGTERM)
    answer = _read_to_close(sock, first)
    assert fleet.proc.wait(timeout=30) == 0, fleet.text()
    assert answer.count(b'"delta": {"content":') < 2000
    assert not pid_alive(engine["pid"])
