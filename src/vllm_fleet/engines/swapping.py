"""Moving one on-demand deployment's engines on or off the GPUs, for `engines/demand.py`:
`release` (out of the rotation, drained for its `swap_drain_timeout`, then slept at its
`sleep` level or stopped) and `bring_up` (woken, or started cold). The supervisor owns
the processes; this asks it to `unload`, `sleep`, `wake` and `ensure`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_fleet.engines import host_memory
from vllm_fleet.engines.supervisor import Supervisor
from vllm_fleet.registry import Registry, State, Upstream
from vllm_fleet.swaps import sleep_fits

log = logging.getLogger(__name__)


class Mover:
    def __init__(self, registry: Registry, supervisor: Supervisor) -> None:
        self.registry = registry
        self.supervisor = supervisor

    def engines(self, dep_id: str) -> list[Upstream]:
        return [u for u in self.registry.upstreams(dep_id) if u.managed]

    async def release(self, dep_id: str, why: str, reason: str, keep_sleeping: bool) -> str:
        """Unload `dep_id` (see the module docstring). Not `keep_sleeping` (unloaded by
        hand): every engine is stopped, asleep or not. Returns what is worth saying
        (a sleep refused or failed), else ""."""
        settings = self.registry.config.deployments[dep_id]
        ups = self.engines(dep_id)
        note = ""
        for up in ups:
            if up.state is State.READY:
                up.set_state(State.UNLOADING, f"{why}: draining its requests in flight")
        deadline = time.monotonic() + settings.swap_drain_timeout
        # Polled: the request path changes `outstanding` and sets no event for it.
        while any(u.outstanding > 0 for u in ups) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        level = settings.sleep if keep_sleeping else 0
        if level == 1 and ups:
            cwd = getattr(ups[0].spec, "cwd", None)
            weights = (
                await asyncio.to_thread(host_memory.weights_size, settings.model, cwd)
                if cwd is not None
                else None
            )
            problem = sleep_fits(weights, host_memory.available())
            if problem is not None:
                log.warning("%s: %s", dep_id, problem)
                note, level = problem, 0

        async def one(up: Upstream) -> str:
            if up.state is State.SLEEPING and keep_sleeping:
                return ""
            said = ""
            if level and up.state is State.UNLOADING:
                problem = await self.supervisor.sleep(up, level)
                if problem is None:
                    return ""
                log.warning("%s: could not sleep (%s); stopping it", up.name, problem)
                said = f"could not sleep: {problem}"
            if up.state is not State.UNLOADED:
                await self.supervisor.unload(up, reason, f"unloaded ({why})")
            return said

        said = [s for s in await asyncio.gather(*(one(up) for up in ups)) if s]
        return "; ".join([note, *said]) if note else "; ".join(said)

    async def bring_up(self, dep_id: str) -> tuple[str, bool]:
        """Wake or cold-start every engine of `dep_id`: (kind: "wake" or "cold_start",
        whether one at least is ready). A wake that fails falls back to a cold start; a
        cold start is one attempt (`ensure(load_once=True)`)."""
        level = self.registry.config.deployments[dep_id].sleep
        ups = self.engines(dep_id)
        kind = "wake" if any(u.state is State.SLEEPING for u in ups) else "cold_start"

        async def one(up: Upstream) -> bool:
            if up.state is State.SLEEPING:
                problem = await self.supervisor.wake(up, level)
                if problem is None:
                    return True
                log.warning("%s: wake failed (%s); starting it cold", up.name, problem)
                await self.supervisor.unload(up, "failure", f"wake failed: {problem}")
            if up.state is State.READY:
                return True
            self.supervisor.ensure(up, "on demand", load_once=True)
            return await self.supervisor.until_ready(up)

        results = await asyncio.gather(*(one(up) for up in ups))
        return kind, any(results)

    async def bring_up_always(self, up: Upstream, level: int) -> None:
        """An engine of a deployment that is always on now (a reload): woken or started."""
        if up.state is State.SLEEPING and await self.supervisor.wake(up, level) is None:
            return
        if up.state is State.SLEEPING:
            await self.supervisor.unload(up, "failure", "wake failed")
        self.supervisor.ensure(up, "reload")
