"""Remote endpoints (`endpoints:`) are probed: one that stops answering leaves the
rotation (the gateway says which, with a 503), and comes back when it answers again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import fake_fleet_file, free_port, wait_until
from vllm_fleet.engines.remote import UNREACHABLE_AFTER, watch_remote
from vllm_fleet.registry import State, Upstream
from vllm_fleet.testing.harness import FakeEngine


def remote(url: str) -> Upstream:
    return Upstream("far-0", "far", url, False, None, State.READY)  # type: ignore[arg-type]


def test_probes_take_an_endpoint_out_and_back_in() -> None:
    async def main() -> None:
        status = {"code": 200}

        async def health(request: web.Request) -> web.Response:
            return web.Response(status=status["code"])

        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        upstream = remote(f"http://127.0.0.1:{port}")
        changes: list[str] = []
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(
                watch_remote(upstream, session, 0.02, stop, lambda u: changes.append(u.state))
            )

            async def settle(state: State) -> None:
                for _ in range(200):
                    if upstream.state is state:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"still {upstream.state}, not {state}")

            status["code"] = 404  # a server without /health: answering, so up
            await asyncio.sleep(0.02 * (UNREACHABLE_AFTER + 3))
            assert upstream.state is State.READY and changes == []
            status["code"] = 503
            await settle(State.UNREACHABLE)
            assert "/health answered 503" in upstream.message
            status["code"] = 200
            await settle(State.READY)
            await runner.cleanup()  # nobody listening: refused
            await settle(State.UNREACHABLE)
            stop.set()
            await task
        assert changes == ["unreachable", "ready", "unreachable"]

    asyncio.run(main())


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_fleet_up_routes_around_an_endpoint_that_stops_answering(tmp_path: Path) -> None:
    port = free_port()
    engine = FakeEngine("org/far", ["org/far", "far"], port=port)
    engine.start()
    deployments = {"far": {"model": "org/far", "endpoints": [f"http://127.0.0.1:{port}"]}}
    path = fake_fleet_file(tmp_path, deployments, engines={"health_interval": 0.2})
    gateway = f"http://127.0.0.1:{_port(path)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_fleet.cli", "up", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    models = f"{gateway}/far/v1/models"
    try:
        wait_until(lambda: _ok(models), what="the endpoint served")
        engine.stop()

        def state() -> str:
            status = get(f"{gateway}/fleet/status")[1]
            return str(status["deployments"]["far"]["upstreams"][0]["state"])

        wait_until(lambda: state() == "unreachable", what="the endpoint marked unreachable")
        code, body = get(models)
        assert code == 503 and body["error"]["code"] == "upstream_unreachable"
        assert "no endpoint of deployment `far` is answering" in body["error"]["message"]
        assert get(f"{gateway}/health?ready=1")[0] == 503
        engine = FakeEngine("org/far", ["org/far", "far"], port=port)
        engine.start()
        wait_until(lambda: _ok(models), what="served again once it answers")
        assert get(f"{gateway}/health?ready=1")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        engine.stop()


def _port(path: Path) -> int:
    return int(yaml.safe_load(path.read_text())["gateway"]["port"])


def _ok(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False
