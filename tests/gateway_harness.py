"""A real gateway served from a background thread, in front of real fake-engine processes.

The deployments point at the engines with `endpoints:` (the fleet's remote form), so the
gateway's own behaviour is tested without the supervisor; tests that need an engine to be
loading or failed set its state through `set_state`, as the supervisor would. With
`probes=True` the supervisor runs on the gateway's loop too and probes the endpoints, as
`fleet up` does (`engines.health_interval`). The loop is uvloop, as `fleet up` runs it.
With `gateway.tls` in the file it serves HTTPS, as `fleet up` does.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import uvloop

from vllm_fleet.config import FleetConfig, loads
from vllm_fleet.engines import Supervisor
from vllm_fleet.gateway.relay import RelayServer
from vllm_fleet.gateway.server import serve
from vllm_fleet.gateway.tls import server_tls
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry, State
from vllm_fleet.testing.harness import free_port


class GatewayThread:
    def __init__(self, fleet_yaml: str, probes: bool = False) -> None:
        self.config: FleetConfig = loads(fleet_yaml)
        self.registry = Registry(
            self.config, build_plan(self.config, Inventory(None, "test"), "python")
        )
        self.port = free_port()
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._gateway: RelayServer | None = None
        self._supervisor = Supervisor(self.registry) if probes else None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.gateway.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the gateway's loop (where the registry lives) and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def set_state(self, upstream: str, state: State, message: str = "") -> None:
        ups = {u.name: u for u in self.registry.all()}
        self.call(lambda: ups[upstream].set_state(state, message))

    def connection_count(self) -> int:
        """Client connections the gateway holds open right now (lingering ones too)."""
        assert self._gateway is not None
        gateway = self._gateway
        return int(self.call(lambda: gateway.connection_count))

    def start(self) -> GatewayThread:
        self._thread.start()
        tls = server_tls(self.config)
        context = tls.context if tls is not None else None
        self._gateway = asyncio.run_coroutine_threadsafe(
            serve(self.config, self.registry, "127.0.0.1", self.port, tls=context), self.loop
        ).result(10)
        supervisor = self._supervisor
        if supervisor is not None:
            asyncio.run_coroutine_threadsafe(supervisor.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self._supervisor is not None:
            asyncio.run_coroutine_threadsafe(self._supervisor.stop(), self.loop).result(10)
        if self._gateway is not None:
            asyncio.run_coroutine_threadsafe(self._gateway.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
