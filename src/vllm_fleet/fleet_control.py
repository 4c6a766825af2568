"""The running fleet, as the gateway's admin routes reach it (`relay/state.py`'s
`Control`): reloads (reloader.py) and restarting one engine by hand.

`POST /fleet/engines/{engine}/restart` (the status page's Restart button) is answered
202 as soon as the restart is under way: the engine leaves the rotation at once, its
requests in flight get `engines.drain_timeout` to finish, then it is stopped by the usual
sequence and started again (a failed engine is simply started again). Refused (409)
while a reload is being applied, and for an engine the fleet does not run or that is
unloaded (on-demand: load its deployment instead).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_fleet.engines import Supervisor
from vllm_fleet.gateway.errors import error_object
from vllm_fleet.registry import Registry
from vllm_fleet.reloader import Reloader

log = logging.getLogger(__name__)


class FleetControl:
    def __init__(self, reloader: Reloader, supervisor: Supervisor, registry: Registry) -> None:
        self.reloader = reloader
        self.supervisor = supervisor
        self.registry = registry

    async def reload(self, file: str | None, dry_run: bool) -> tuple[int, dict[str, Any]]:
        return await self.reloader.reload(file, dry_run)

    async def restart(self, engine: str) -> tuple[int, dict[str, Any]]:
        """Restart the engine named `engine`; the HTTP status and the JSON answer."""
        upstream = next((u for u in self.registry.all() if u.name == engine), None)
        if upstream is None:
            names = ", ".join(u.name for u in self.registry.all() if u.managed) or "none"
            return 404, error_object(
                404, f"no engine `{engine}` in the fleet; engines: {names}", "engine_not_found"
            )
        if self.reloader.busy:
            return 409, error_object(
                409,
                "a reload is being applied; restart the engine once it is done "
                "(`fleet status` says when)",
                "reload_in_progress",
            )
        drain = self.registry.config.engines.drain_timeout
        was = upstream.state.value
        why = self.supervisor.restart(upstream, drain)
        if why is not None:
            return 409, error_object(409, f"cannot restart {engine}: {why}", "cannot_restart")
        log.warning("%s: restarting, asked through POST /fleet/engines/%s/restart", engine, engine)
        return 202, {
            "engine": engine,
            "deployment": upstream.deployment,
            "result": "restarting",
            "message": (
                f"{engine} ({was}) is out of the rotation; requests in flight get up to "
                f"{drain:g} s, then it is stopped and started again"
            ),
        }
