"""The engine supervisor with real engine processes (the fake engine, or tiny scripts)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import fake_fleet_file, free_port, group_members, pid_alive
from vllm_fleet.config import load
from vllm_fleet.engines import EngineEvent, Supervisor
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry, State, Upstream
from vllm_fleet.testing.harness import engine_json, engine_request


def make_supervisor(path: Path) -> tuple[Supervisor, Registry, list[EngineEvent]]:
    config = load(path)
    plan = build_plan(config, Inventory(None, "tests"), sys.executable)
    registry = Registry(config, plan)
    events: list[EngineEvent] = []
    return Supervisor(registry, on_event=events.append), registry, events


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not met in time")
        await asyncio.sleep(0.05)
    return value


async def get_json(url: str, path: str) -> Any:
    """GET `path` straight from the engine at `url` (its socket, or its port)."""
    return await asyncio.to_thread(engine_json, url, path)


async def crash(url: str, status: int) -> None:
    # The engine exits before it answers.
    with contextlib.suppress(OSError, http.client.HTTPException):
        await asyncio.to_thread(engine_request, url, f"/fake/crash?status={status}", "POST", b"")


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def only(registry: Registry) -> Upstream:
    (upstream,) = registry.all()
    return upstream


def test_engine_becomes_ready_and_sees_its_gpus(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path, {"qwen": {"model": "org/qwen", "gpus": [3, 5], "aliases": ["q"]}}
    )
    sup, registry, events = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="engine ready")
            env = await get_json(up.url, "/fake/env")
            assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
            assert env["pid"] == up.pid
            assert env["served_names"] == ["org/qwen", "qwen", "q"]
            snap = registry.snapshot()["deployments"]["qwen"]
            assert snap["ready"] == 1
            assert snap["upstreams"][0]["state"] == "ready"
        finally:
            await sup.stop()

    run(body)
    states = [e.state for e in events]
    assert states[:2] == [State.STARTING, State.READY]
    assert only(registry).state is State.STOPPED
    log = (tmp_path / "logs" / "qwen-0.log").read_text()
    assert "serving" in log  # the engine's own output went to its log file


def test_engine_starts_in_the_fleet_files_directory_with_its_served_name(
    tmp_path: Path,
) -> None:
    # A relative command path (and so a relative local model folder) is relative to the
    # fleet file, whatever directory the fleet runs from.
    (tmp_path / "engine.py").write_text(
        "import runpy, sys\n"
        "sys.argv[0] = 'fake_vllm'\n"
        "runpy.run_module('vllm_fleet.testing.fake_vllm', run_name='__main__')\n"
    )
    path = fake_fleet_file(
        tmp_path,
        {"local": {"model": "./models/m1", "served_name": "org/m1"}},
        engine_command=["{python}", "./engine.py", "{model}"],
    )
    sup, registry, _ = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="engine ready")
            env = await get_json(up.url, "/fake/env")
            assert env["served_names"] == ["org/m1", "./models/m1", "local"]
        finally:
            await sup.stop()

    assert Path.cwd() != tmp_path
    run(body)


def test_engine_that_exits_is_restarted_whatever_its_status(tmp_path: Path) -> None:
    path = fake_fleet_file(tmp_path, {"m": {"model": "org/m"}})
    sup, registry, _ = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            for restarts, status in enumerate((0, 3), start=1):
                await until(lambda: up.state is State.READY, what="engine ready")
                old_pid = up.pid
                assert old_pid is not None
                await crash(up.url, status)
                await until(
                    lambda r=restarts: up.state is State.READY and up.restarts == r,  # type: ignore[misc]
                    what=f"ready again after exit {status}",
                )
                assert up.pid != old_pid
                assert not pid_alive(old_pid)
        finally:
            await sup.stop()

    run(body)


def test_a_passing_health_check_readmits_an_engine_the_gateway_ejected(tmp_path: Path) -> None:
    path = fake_fleet_file(tmp_path, {"m": {"model": "org/m"}})
    sup, registry, _ = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="engine ready")
            up.eject("ConnectionResetError: the gateway's request was reset")
            await until(lambda: up.ejected is None, what="readmitted by its next health check")
            assert up.state is State.READY and up.restarts == 0
            # Ejected, then exited and restarted: in the rotation again once ready.
            up.eject("ConnectionRefusedError")
            await crash(up.url, 1)
            await until(lambda: up.restarts == 1 and up.state is State.READY, what="restarted")
            assert up.ejected is None
        finally:
            await sup.stop()

    run(body)


def test_engine_that_keeps_failing_is_marked_failed_with_its_log_tail(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"gated": {"model": "org/gated", "args": ["--fail-start"]}},
        engines={"max_restarts": 2, "backoff_initial": 0.05},
    )
    sup, registry, events = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.FAILED, what="engine failed")
            await asyncio.sleep(0.3)  # no further restart after giving up
            assert up.state is State.FAILED
        finally:
            await sup.stop()

    run(body)
    up = only(registry)
    assert up.restarts == 2
    assert up.state is State.FAILED  # stop() keeps the reason visible
    assert "exited with status 1" in up.message
    assert "gave up after 3" in up.message
    (failed,) = [e for e in events if e.state is State.FAILED]
    tail = "\n".join(failed.log_tail)
    assert "gated repo" in tail
    assert "HF_TOKEN" in tail
    assert "vllm-fleet" not in tail  # our own start markers are not part of the tail
    log = (tmp_path / "logs" / "gated-0.log").read_text()
    assert log.count("---- vllm-fleet: start") == 3


def test_engine_not_ready_within_its_start_timeout_is_a_failure(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"slow": {"model": "org/slow", "args": ["--startup-delay", "30"], "start_timeout": 0.5}},
        engines={"max_restarts": 0},
    )
    sup, registry, _ = make_supervisor(path)
    pids: list[int] = []

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.pid, what="spawned")
            pids.append(up.pid)  # type: ignore[arg-type]
            await until(lambda: up.state is State.FAILED, what="failed")
        finally:
            await sup.stop()

    run(body)
    assert "not ready after its start_timeout of 0.5s" in only(registry).message
    assert not pid_alive(pids[0])  # the engine that never got ready was stopped


def test_engine_command_that_cannot_run_fails_at_once_with_a_fix(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path, {"m": {"model": "org/m"}}, engine_command=["no-such-vllm", "serve", "{model}"]
    )
    sup, registry, events = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            await until(lambda: only(registry).state is State.FAILED, what="failed")
        finally:
            await sup.stop()

    run(body)
    up = only(registry)
    assert "cannot run `no-such-vllm`: not found" in up.message
    assert "engine_command" in up.message
    assert up.restarts == 0
    assert [e.state for e in events] == [State.FAILED]


def test_busy_port_fails_the_engine_with_a_fix(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = fake_fleet_file(tmp_path, {"m": {"model": "org/m", "listen": "tcp", "port": port}})
        sup, registry, events = make_supervisor(path)

        async def body() -> None:
            await sup.start()
            try:
                await until(lambda: only(registry).state is State.FAILED, what="failed")
            finally:
                await sup.stop()

        run(body)
    up = only(registry)
    assert f"port {port}" in up.message
    assert "`port:`" in up.message
    assert up.pid is None and up.restarts == 0  # nothing was started
    assert not (tmp_path / "logs" / "m-0.log").exists()
    assert [e.state for e in events] == [State.FAILED]


# An engine that ignores SIGTERM and leaves a worker (also ignoring SIGTERM) in its
# process group, like a stuck vLLM api server with its engine core.
STUBBORN = textwrap.dedent(
    """
    import http.server, signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(sys.argv[1], "w").write(str(worker.pid))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Health).serve_forever()
    """
)


def test_stop_kills_the_whole_process_group_after_the_grace_period(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    worker_file = tmp_path / "worker.pid"
    path = fake_fleet_file(
        tmp_path,
        {
            "s": {
                "model": "x",
                "command": ["{python}", str(script), str(worker_file), "{port}"],
                "listen": "tcp",
            }
        },
        engines={"stop_timeout": 0.5},
    )
    sup, registry, _ = make_supervisor(path)
    pids: list[int] = []

    async def body() -> None:
        await sup.start()
        try:
            up = only(registry)
            await until(lambda: up.state is State.READY, what="ready")
            await until(lambda: worker_file.exists() and worker_file.read_text(), what="worker")
            assert up.pid is not None
            pids.extend([up.pid, int(worker_file.read_text())])
            assert sorted(group_members(up.pid)) == sorted(pids)
        finally:
            await sup.stop()
            await sup.stop()  # idempotent

    run(body)
    assert not any(pid_alive(pid) for pid in pids)
    assert group_members(pids[0]) == []
    assert only(registry).state is State.STOPPED
    assert only(registry).pid is None


def test_stop_while_engines_are_still_loading_leaves_no_process(tmp_path: Path) -> None:
    path = fake_fleet_file(
        tmp_path,
        {
            "a": {"model": "org/a", "args": ["--startup-delay", "30"]},
            "b": {"model": "org/b", "args": ["--startup-delay", "30"], "replicas": 2},
        },
    )
    sup, registry, _ = make_supervisor(path)
    pids: list[int] = []

    async def body() -> None:
        await sup.start()
        try:
            await until(lambda: all(u.pid for u in registry.all()), what="all spawned")
            assert all(u.state is State.STARTING for u in registry.all())
            pids.extend(u.pid for u in registry.all() if u.pid)
        finally:
            await sup.stop()

    run(body)
    assert len(pids) == 3
    assert not any(pid_alive(pid) for pid in pids)
    assert all(u.state is State.STOPPED for u in registry.all())


# Healthy once, then /health answers 503 (like vLLM after its engine core died).
SICKLY = textwrap.dedent(
    """
    import http.server, sys
    seen = []
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(1)
            self.send_response(200 if len(seen) == 1 else 503); self.end_headers()
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
    """
)


def test_ready_engine_failing_health_checks_is_restarted(tmp_path: Path) -> None:
    script = tmp_path / "sickly.py"
    script.write_text(SICKLY)
    path = fake_fleet_file(
        tmp_path,
        {"s": {"model": "x", "command": ["{python}", str(script), "{port}"], "listen": "tcp"}},
        engines={"max_restarts": 1, "health_interval": 0.1, "backoff_initial": 0.05},
    )
    sup, registry, events = make_supervisor(path)

    async def body() -> None:
        await sup.start()
        try:
            await until(lambda: only(registry).state is State.FAILED, what="failed")
        finally:
            await sup.stop()

    run(body)
    states = [e.state for e in events]
    # start, ready, unhealthy -> restart, ready, unhealthy -> gave up
    assert states.count(State.READY) == 2
    assert only(registry).restarts == 1
    assert "/health answered 503" in only(registry).message


def test_free_port_helper_gives_a_bindable_port() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
