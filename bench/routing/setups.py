"""The four front ends compared, each in front of the same two engines: nginx round robin
(the vhost `fleet nginx` renders for `routing: round_robin`), the fleet with
`least_outstanding` and with `prefix` (one `fleet up`, its policy switched by a reload),
and vllm-router with `cache_aware`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.fronts import start_nginx
from bench.procs import Cores, Managed, free_port
from bench.routing import router
from bench.routing.fleet import DEPLOYMENT, Fleet


@dataclass(frozen=True)
class Front:
    name: str  # the row's label
    url: str  # where the chat completions go


SETUPS = ("nginx", "least_outstanding", "prefix", "vllm-router")


def _all_cores() -> Cores:
    every = frozenset(os.sched_getaffinity(0))
    return Cores(every, every, every)


@contextmanager
def front(name: str, fleet: Fleet, workdir: Path, router_bin: Path | None) -> Iterator[Front]:
    """The front end `name`, started (or switched to) and, on leaving, stopped."""
    chat = "/v1/chat/completions"
    if name in ("least_outstanding", "prefix"):
        fleet.set_routing(name)
        yield Front(f"fleet {name}", f"{fleet.url}/{DEPLOYMENT}{chat}")
        return
    if name == "nginx":
        rendered = fleet.write("round_robin", workdir / "nginx-fleet.yaml")
        nginx, port = start_nginx(workdir, rendered, _all_cores())
        try:
            yield Front("nginx round robin", f"http://127.0.0.1:{port}/{DEPLOYMENT}{chat}")
        finally:
            nginx.stop()
        return
    if name == "vllm-router":
        if router_bin is None:
            raise RuntimeError("vllm-router is not installed: run `make router-env`")
        port = free_port()
        argv = router.router_command(router_bin, port, fleet.engine_urls, "cache_aware")
        proc = Managed("vllm-router", argv, _all_cores().proxy, workdir / "vllm-router.log")
        try:
            proc.wait_port(port, timeout=60)
            asyncio.run(router.wait_ready(port, fleet.engine_urls, timeout=60))
            yield Front("vllm-router cache_aware", f"http://127.0.0.1:{port}{chat}")
        finally:
            proc.stop()
        return
    raise ValueError(f"unknown setup {name!r}")
