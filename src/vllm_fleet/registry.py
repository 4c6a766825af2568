"""The live state of every upstream (engine replica or remote endpoint).

The supervisor owns the writes (one task per engine sets `state`); the gateway reads
states to pick a replica and counts its own outstanding requests. Everything runs on
one event loop, so no locks. `snapshot()` is what status endpoints and the CLI show.

A reload (engines/rollout.py) changes which upstreams route: `add`, `remove` (out of
routing at once; shown as `retiring` until stopped), `swap` (a replacement takes the
old one's place), and `reconfigure` (the new file's deployments, in its order). It also
keeps the fleet file's generation (`fleet`) and the counts the metrics show.

Passive ejection is apart from the state: the gateway `eject()`s a ready upstream whose
connection failed before any answer (refused, connect timeout, closed unanswered), which
takes it out of the rotation; only a health check that began after the ejection and
passed (`readmit()`, by the supervisor's checks and the remote probes) brings it back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from vllm_fleet.config import FleetConfig
from vllm_fleet.plan import EngineSpec, Plan, RemoteSpec

if TYPE_CHECKING:  # a type only: importing `engines` here would be a cycle at run time
    from vllm_fleet.engines.vllm_metrics import EngineLoad


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
    # On-demand engines (engines/demand.py): not running until asked for; out of the
    # rotation while draining to make room; asleep in vLLM's sleep mode.
    UNLOADED = "unloaded"
    UNLOADING = "unloading"
    SLEEPING = "sleeping"


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
    served: int = 0  # POST requests sent to it (the gateway counts; idle unload reads it)
    message: str = ""
    since: float = field(default_factory=time.time)
    ejected: str | None = None  # why the gateway took it out of the rotation; None: in it
    ejected_at: float = 0.0  # time.monotonic() of the last failure that ejected it
    stalls: int = 0  # times it was found stalled and restarted
    # Its engine's last /metrics reading (every engines.health_interval; engines without
    # vLLM's metrics stay at 0): requests waiting for a batch, KV-cache use (0 to 1).
    # The `prefix` and `session` routing policies read them (gateway/policies/load.py).
    engine_waiting: float = 0.0
    kv_cache: float = 0.0
    load: EngineLoad | None = None  # the whole last reading (None: none yet)
    load_at: float = 0.0  # time.time() of that reading
    # Restarting after a failure: time.time() when its backoff ends (None otherwise).
    retry_at: float | None = None
    # The last failure that restarted it (exit, unhealthy, stalled), kept once it is
    # ready again so `fleet status` can say why it restarted; and when (time.time()).
    last_failure: str = ""
    last_failure_at: float | None = None
    # LoRA adapters (engines/adapters.py keeps these): loaded on this engine, name -> what
    # was loaded; the last load that failed, name -> vLLM's message; the gateway's
    # requests in flight per adapter (a removed adapter is unloaded once they are done).
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_errors: dict[str, str] = field(default_factory=dict)
    adapter_inflight: dict[str, int] = field(default_factory=dict)

    def set_state(self, state: State, message: str = "") -> None:
        if state != self.state:
            self.since = time.time()
        self.state = state
        self.message = message

    def read_load(self, load: EngineLoad) -> None:
        """Its engine's latest /metrics reading."""
        self.engine_waiting, self.kv_cache = load.waiting, load.kv_cache
        self.load, self.load_at = load, time.time()

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
            data["socket"] = str(spec.uds) if spec.uds is not None else None
            data["gpus"] = list(spec.gpus) if spec.gpus is not None else None
            data["log"] = str(spec.log_path)
        if self.adapters or self.adapter_errors:
            data["adapters"] = {
                **{name: "loaded" for name in self.adapters},
                **{name: f"failed: {why}" for name, why in self.adapter_errors.items()},
            }
        return data


class Registry:
    def __init__(self, config: FleetConfig, plan: Plan) -> None:
        self.config = config
        self.plan = plan
        self.by_deployment: dict[str, list[Upstream]] = {
            dep_id: [] for dep_id in config.deployments
        }
        for engine in plan.engines:
            upstream = upstream_for(engine)
            if config.deployments[engine.deployment].on_demand:
                upstream.set_state(State.UNLOADED, "unloaded (start: on_demand)")
            self.by_deployment[engine.deployment].append(upstream)
        for remote in plan.remotes:
            self.by_deployment[remote.deployment].append(upstream_for(remote))
        # Out of routing, draining or stopping (a reload removed or replaced them).
        self.retiring: list[Upstream] = []
        # Replacements starting beside the engine they replace (not routed to yet).
        self.standby: list[Upstream] = []
        # The fleet file's generation and its last reload (reloader.py writes it).
        self.fleet: dict[str, Any] = {}
        self.reloads: dict[str, int] = {}  # result -> reloads
        self.engine_starts: dict[tuple[str, str], int] = {}  # (deployment, reason) -> n
        self.engine_stops: dict[tuple[str, str], int] = {}  # (deployment, reason) -> n

    def upstreams(self, dep_id: str) -> list[Upstream]:
        return self.by_deployment.get(dep_id, [])

    def all(self) -> list[Upstream]:
        return [u for ups in self.by_deployment.values() for u in ups]

    # ------------------------------------------------------------ reloads

    def running_plan(self) -> Plan:
        """The plan of what runs now (routed, standby or retiring aside): the `prior` a
        reload builds its plan against."""
        ups = self.all()
        engines = tuple(u.spec for u in ups if isinstance(u.spec, EngineSpec))
        remotes = tuple(u.spec for u in ups if isinstance(u.spec, RemoteSpec))
        return Plan(engines, remotes, self.plan.inventory, self.plan.warnings, self.plan.groups)

    def reconfigure(self, config: FleetConfig, plan: Plan) -> None:
        """The new file's deployments, in its order (each removed one must be empty)."""
        self.config = config
        self.plan = plan
        self.by_deployment = {
            dep_id: self.by_deployment.get(dep_id, []) for dep_id in config.deployments
        }

    def add(self, upstream: Upstream) -> None:
        ups = self.by_deployment.setdefault(upstream.deployment, [])
        ups.append(upstream)
        ups.sort(key=lambda u: u.spec.replica)

    def remove(self, upstream: Upstream) -> None:
        """Out of routing now; listed as retiring until `retired`."""
        ups = self.by_deployment.get(upstream.deployment, [])
        if upstream in ups:
            ups.remove(upstream)
        if upstream not in self.retiring:
            self.retiring.append(upstream)

    def retired(self, upstream: Upstream) -> None:
        if upstream in self.retiring:
            self.retiring.remove(upstream)
        if upstream in self.standby:
            self.standby.remove(upstream)

    def swap(self, old: Upstream, new: Upstream) -> None:
        """`new` (ready, on standby) takes `old`'s place in routing; `old` retires."""
        if new in self.standby:
            self.standby.remove(new)
        ups = self.by_deployment.setdefault(new.deployment, [])
        if old in ups:
            ups[ups.index(old)] = new
        else:
            self.add(new)
        if old not in self.retiring:
            self.retiring.append(old)

    def count_start(self, deployment: str, reason: str) -> None:
        key = (deployment, reason)
        self.engine_starts[key] = self.engine_starts.get(key, 0) + 1

    def count_stop(self, deployment: str, reason: str) -> None:
        key = (deployment, reason)
        self.engine_stops[key] = self.engine_stops.get(key, 0) + 1

    # ------------------------------------------------------------ status

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
        data: dict[str, Any] = {"deployments": deployments}
        if self.config.adapters:
            data["adapters"] = self.adapters_snapshot()
        data["retiring"] = [u.snapshot() for u in self.retiring]
        data["standby"] = [u.snapshot() for u in self.standby]
        if self.fleet:
            data["fleet"] = dict(self.fleet)
        return data

    def adapters_snapshot(self) -> dict[str, Any]:
        """Each adapter: its base, what it loads, and on which of the base's engines it is
        loaded (or why its load failed)."""
        out: dict[str, Any] = {}
        for a_id, adapter in self.config.adapters.items():
            ups = self.upstreams(adapter.base)
            on = {}
            for up in ups:
                if a_id in up.adapters:
                    on[up.name] = "loaded"
                elif a_id in up.adapter_errors:
                    on[up.name] = f"failed: {up.adapter_errors[a_id]}"
                else:
                    on[up.name] = "not loaded" if up.state is State.READY else up.state.value
            out[a_id] = {
                "base": adapter.base,
                "adapter": self.config.adapter_path(adapter),
                "aliases": list(adapter.aliases),
                "ready": sum(1 for u in ups if u.state is State.READY and a_id in u.adapters),
                "replicas": len(ups),
                "engines": on,
            }
        return out


def upstream_for(spec: EngineSpec | RemoteSpec) -> Upstream:
    """A new upstream for a spec: an engine (stopped until started) or a remote endpoint,
    which counts as ready until its probes fail (engines/remote.py)."""
    if isinstance(spec, EngineSpec):
        return Upstream(spec.name, spec.deployment, spec.url, True, spec)
    return Upstream(spec.name, spec.deployment, spec.url, False, spec, State.READY)
