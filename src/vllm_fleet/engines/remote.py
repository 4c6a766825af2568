"""Remote endpoints (`endpoints:` in a deployment): not started here, but watched.

Every `engines.health_interval` seconds each is asked `GET <url>/health` (vLLM's health
check; any answer under 500 counts as up, so an OpenAI-compatible server without
`/health` is up as long as it answers). UNREACHABLE_AFTER failures in a row (refused,
no answer within PROBE_TIMEOUT, a 5xx) mark it UNREACHABLE: the gateway stops sending
it requests, and a deployment with no replica left answers 503 saying which endpoint is
not answering. One good answer makes it READY again, and readmits an endpoint the
gateway ejected (a request's connection failed) before that probe began. Endpoints
start READY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from vllm_fleet.registry import State, Upstream

log = logging.getLogger(__name__)

UNREACHABLE_AFTER = 3
PROBE_TIMEOUT = 5.0  # a busy engine may be slow to answer /health; not down for that


async def probe(session: aiohttp.ClientSession, url: str, timeout: float) -> str | None:
    """None when the endpoint answers `GET /health` under 500; else why not."""
    try:
        async with session.get(
            f"{url}/health", timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as resp:
            await resp.read()
            if resp.status >= 500:
                return f"/health answered {resp.status}"
            return None
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Said in words, never as Python's class name: it reaches clients in the 503.
        return str(exc) or f"no answer within {timeout:g} s"


async def watch_remote(
    upstream: Upstream,
    session: aiohttp.ClientSession,
    interval: float,
    stop: asyncio.Event,
    changed: Callable[[Upstream], None],
) -> None:
    """Probe `upstream` every `interval` seconds until `stop`; `changed` on each change
    of its state."""
    failures = 0
    while not stop.is_set():
        began = time.monotonic()
        problem = await probe(session, upstream.url, PROBE_TIMEOUT)
        if problem is None:
            failures = 0
            if upstream.readmit(began):
                log.warning(
                    "remote endpoint %s answers its probe: back in the rotation", upstream.name
                )
            if upstream.state is not State.READY:
                upstream.set_state(State.READY, "answering again")
                log.warning("remote endpoint %s answers again", upstream.name)
                changed(upstream)
        else:
            failures += 1
            if failures >= UNREACHABLE_AFTER and upstream.state is not State.UNREACHABLE:
                upstream.set_state(State.UNREACHABLE, f"not answering: {problem}")
                log.warning("remote endpoint %s is not answering: %s", upstream.name, problem)
                changed(upstream)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
