"""The fake engine's test hooks, routes vLLM does not have: `GET /fake/stats` (counts, the
last request as received, and each feature's numbers; `?reset=1` clears them), `GET
/fake/env` (pid, environment, argv), `POST /fake/crash?status=N` (exits N at once), `POST
/fake/hang` (behave like an engine whose core deadlocked; see fake_vllm.py)."""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol

from aiohttp import web

from vllm_fleet.testing.fake_lora import Loras
from vllm_fleet.testing.fake_prefix import Prefix
from vllm_fleet.testing.fake_sleep import SleepMode


class Hooked(Protocol):
    """What the hooks read and reset of the fake engine (fake_vllm.Engine)."""

    model: str
    names: list[str]
    argv: list[str]
    requests: int
    aborted: int
    in_flight: int
    hung: bool
    last_request: dict[str, Any] | None
    sleep: SleepMode
    loras: Loras
    prefix: Prefix


def install(app: web.Application, engine: Hooked) -> None:
    async def hang(request: web.Request) -> web.Response:
        engine.hung = True
        return web.json_response({"hung": True, "running": engine.in_flight})

    async def stats(request: web.Request) -> web.Response:
        snapshot = {
            "requests": engine.requests,
            "aborted": engine.aborted,
            "in_flight": engine.in_flight,
            "last_request": engine.last_request,
            **engine.sleep.stats(),
            **engine.loras.stats(),
            **engine.prefix.stats(),
        }
        if request.query.get("reset"):
            engine.requests = engine.aborted = 0
            engine.last_request = None
            engine.prefix.reset_stats()
        return web.json_response(snapshot)

    async def env(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "pid": os.getpid(),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "VLLM_SKIP_MODEL_NAME_VALIDATION": os.environ.get(
                    "VLLM_SKIP_MODEL_NAME_VALIDATION"
                ),
                "HF_TOKEN_set": bool(os.environ.get("HF_TOKEN")),
                "argv": engine.argv,
                "served_names": engine.names,
                "model": engine.model,
            }
        )

    async def crash(request: web.Request) -> web.Response:
        engine.sleep.ledger.release()  # a dead process holds no GPU memory
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(request.query.get("status", "0")))

    app.router.add_get("/fake/stats", stats)
    app.router.add_get("/fake/env", env)
    app.router.add_post("/fake/crash", crash)
    app.router.add_post("/fake/hang", hang)
