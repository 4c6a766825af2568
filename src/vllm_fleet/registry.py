"""The live state of every upstream (engine replica or remote endpoint).

The supervisor owns the writes (one task per engine sets `state`); the gateway reads
states to pick a replica and counts its own outstanding requests. Everything runs on
one event loop, so no locks. `snapshot()` is what status endpoints and the CLI show.

Passive ejection is apart from the state: the gateway `eject()`s a ready upstream whose
connection failed before any answer (refused, connect timeout, closed unanswered), which
takes it out of the rotation; only a health check that began after the ejection and
passed (`readmit()`, by the supervisor's checks and the remote probes) brings it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vllm_fleet.config import FleetConfig
from vllm_fleet.plan import EngineSpec, Plan, RemoteSpec


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"
    UNREACHABLE = "unreachable"  # a remote endpoint that stopped answering its probes
    # A ready engine busy without token progress (engines/stall.py): out of the
    # rotation while it is stopped, then restarted like any failure.
    STALLED = "stalled"


@dataclass(eq=False)
class Upstream:
    name: str
    deployment: str
    url: str
    managed: bool  # True: an engine this fleet runs; False: a remote endpoint
    spec: EngineSpec | RemoteSpec
    state: State = State.STOPPED
    pid: int | None = None
    restarts: int = 0
    outstanding: int = 0
    message: str = ""
    since: float = field(default_factory=time.time)
    ejected: str | None = None  # why the gateway took it out of the rotation; None: in it
    ejected_at: float = 0.0  # time.monotonic() of the last failure that ejected it
    stalls: int = 0  # times it was found stalled and restarted
    # The last failure that restarted it (exit, unhealthy, stalled), kept once it is
    # ready again so `fleet status` can say why it restarted; and when (time.time()).
    last_failure: str = ""
    last_failure_at: float | None = None

    def set_state(self, state: State, message: str = "") -> None:
        if state != self.state:
            self.since = time.time()
        self.state = state
        self.message = message

    def eject(self, why: str) -> bool:
        """Out of the rotation until a health check begun after now passes; True when it
        was in the rotation until now."""
        was_in = self.ejected is None
        self.ejected = why
        self.ejected_at = time.monotonic()
        return was_in

    def readmit(self, check_began: float) -> bool:
        """A health check begun at `check_began` (time.monotonic()) passed: back in the
        rotation, unless it was ejected after that check began. True when readmitted."""
        if self.ejected is None or self.ejected_at > check_began:
            return False
        self.ejected = None
        return True

    def snapshot(self) -> dict[str, Any]:
        spec = self.spec
        data: dict[str, Any] = {
            "name": self.name,
            "deployment": self.deployment,
            "url": self.url,
            "managed": self.managed,
            "state": self.state.value,
            "since": round(self.since, 3),
            "pid": self.pid,
            "restarts": self.restarts,
            "outstanding": self.outstanding,
            "message": self.message,
            "ejected": self.ejected,
        }
        if self.managed:
            data["stalls"] = self.stalls
            data["last_failure"] = self.last_failure
            data["last_failure_at"] = (
                round(self.last_failure_at, 3) if self.last_failure_at is not None else None
            )
        if isinstance(spec, EngineSpec):
            data["port"] = spec.port
            data["gpus"] = list(spec.gpus) if spec.gpus is not None else None
            data["log"] = str(spec.log_path)
        return data


class Registry:
    def __init__(self, config: FleetConfig, plan: Plan) -> None:
        self.config = config
        self.plan = plan
        self.by_deployment: dict[str, list[Upstream]] = {
            dep_id: [] for dep_id in config.deployments
        }
        for engine in plan.engines:
            self.by_deployment[engine.deployment].append(
                Upstream(engine.name, engine.deployment, engine.url, True, engine)
            )
        for remote in plan.remotes:
            # Remote endpoints are not started here; they count as ready until their
            # probes fail (engines/remote.py).
            self.by_deployment[remote.deployment].append(
                Upstream(remote.name, remote.deployment, remote.url, False, remote, State.READY)
            )

    def upstreams(self, dep_id: str) -> list[Upstream]:
        return self.by_deployment.get(dep_id, [])

    def all(self) -> list[Upstream]:
        return [u for ups in self.by_deployment.values() for u in ups]

    def snapshot(self) -> dict[str, Any]:
        deployments = {}
        for dep_id, ups in self.by_deployment.items():
            dep = self.config.deployments[dep_id]
            ready = sum(1 for u in ups if u.state is State.READY)
            deployments[dep_id] = {
                "model": dep.model,
                "aliases": list(dep.aliases),
                "ready": ready,
                "replicas": len(ups),
                "upstreams": [u.snapshot() for u in ups],
            }
        return {"deployments": deployments}
