"""Pure: the status page's one JSON answer, `GET /fleet/overview`, from the gateway's core.

Every deployment (and LoRA adapter) with its state, what the gateway measured of it in
the last minute and five (gateway/recent.py), its engines' load as their `/metrics` last
showed it (the supervisor reads it every `engines.health_interval`), and each replica:
state and since when, pid, node, GPUs, port or socket, restarts, when a restart's backoff
ends, and the tail of its log where it helps (loading: the last line; failed or stalled:
the last lines). Then the GPUs with the engines that hold them, the fleet file's
generation and last reload, and the requests and tokens of each key since the gateway
started. The log tails and the GPU reading are read at the edge (relay/console.py) and
passed in; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from vllm_fleet import __version__
from vllm_fleet.gateway.core import Core
from vllm_fleet.gpus import GpuUse
from vllm_fleet.masking import mask_text
from vllm_fleet.plan import EngineSpec
from vllm_fleet.registry import State, Upstream
from vllm_fleet.swaps import phase_of

TAIL_FAILED = 20  # log lines shown for a failed or stalled engine
# States whose log tail the page shows: the last line while loading, more after a failure.
TAIL_STATES = {State.STARTING: 1, State.FAILED: TAIL_FAILED, State.STALLED: TAIL_FAILED}


@dataclass(frozen=True)
class Readings:
    """What the edge read for one answer."""

    now: float  # time.time()
    node: str  # this machine's name
    log_tails: Mapping[str, Sequence[str]]  # engine name -> its last log lines
    gpus: GpuUse
    actions: Mapping[str, bool]  # reload, restart, load: which action routes are served


def wants_tail(upstream: Upstream) -> int:
    """How many of its last log lines the page shows for `upstream` (0: none)."""
    if not upstream.managed or not isinstance(upstream.spec, EngineSpec):
        return 0
    return TAIL_STATES.get(upstream.state, 0)


def overview(core: Core, readings: Readings) -> dict[str, Any]:
    registry = core.registry
    config = core.config
    now = readings.now
    recent = core.accounting.recent
    deployments: list[dict[str, Any]] = []
    for dep_id, dep in config.deployments.items():
        ups = registry.upstreams(dep_id)
        figures = recent.figures(dep_id, now)
        figures["in_flight"] = sum(u.outstanding for u in ups)
        deployments.append(
            {
                "id": dep_id,
                "kind": "endpoints" if dep.endpoints else "engines",
                "model": dep.model,
                "base": None,
                "start": dep.start,
                "state": phase_of(ups).value,
                "routing": dep.routing,
                "ready": sum(1 for u in ups if u.state is State.READY),
                "replicas": len(ups),
                "recent": figures,
                "series": recent.series(dep_id, now),
                "engine": _engines_load(ups),
                "upstreams": [_replica(u, readings) for u in ups],
            }
        )
    for a_id, adapter in config.adapters.items():
        ups = registry.upstreams(adapter.base)
        base = config.deployments.get(adapter.base)
        holding = [u for u in ups if a_id in u.adapters]
        figures = recent.figures(a_id, now)
        figures["in_flight"] = sum(u.adapter_inflight.get(a_id, 0) for u in ups)
        deployments.append(
            {
                "id": a_id,
                "kind": "adapter",
                "model": config.adapter_path(adapter),
                "base": adapter.base,
                "start": base.start if base is not None else "always",
                "state": phase_of(ups).value if holding or not ups else _adapter_state(a_id, ups),
                "routing": base.routing if base is not None else "least_outstanding",
                "ready": sum(1 for u in holding if u.state is State.READY),
                "replicas": len(ups),
                "recent": figures,
                "series": recent.series(a_id, now),
                "engine": None,  # its base's engines: shown with the base
                "upstreams": [],
            }
        )
    fleet = dict(registry.fleet)
    fleet.pop("hash", None)
    return {
        "now": round(now, 3),
        "gateway": {
            "started": round(core.started, 3),
            "host": config.gateway.host,
            "port": config.gateway.port,
            "keys": core.keys.enabled,
            "version": __version__,
            "node": readings.node,
        },
        "fleet": fleet,
        "actions": dict(readings.actions),
        "deployments": deployments,
        "retiring": [_replica(u, readings) for u in registry.retiring],
        "gpus": _gpus(core, readings),
        "keys": _keys(core),
    }


def _adapter_state(a_id: str, ups: Sequence[Upstream]) -> str:
    """An adapter no engine holds: failed where every ready engine failed to load it,
    loading where one is to load it, else its base's phase."""
    ready = [u for u in ups if u.state is State.READY]
    if ready and all(a_id in u.adapter_errors for u in ready):
        return "failed"
    if ready:
        return "loading"
    return phase_of(ups).value


def _engines_load(ups: Sequence[Upstream]) -> dict[str, float] | None:
    """The ready engines' last readings: running and waiting summed, KV cache the fullest."""
    loads = [u.load for u in ups if u.load is not None and u.state is State.READY]
    if not loads:
        return None
    return {
        "running": sum(load.running for load in loads),
        "waiting": sum(load.waiting for load in loads),
        "kv_cache": max(load.kv_cache for load in loads),
    }


def _replica(up: Upstream, readings: Readings) -> dict[str, Any]:
    spec = up.spec if isinstance(up.spec, EngineSpec) else None
    load = up.load if up.state is State.READY else None
    return {
        "name": up.name,
        "deployment": up.deployment,
        "state": up.state.value,
        "since": round(up.since, 3),
        "message": up.message,
        "pid": up.pid,
        "node": readings.node if up.managed else (urlsplit(up.url).hostname or up.url),
        "gpus": list(spec.gpus) if spec is not None and spec.gpus is not None else None,
        "port": spec.port if spec is not None and spec.uds is None else None,
        "socket": str(spec.uds) if spec is not None and spec.uds is not None else None,
        "url": up.url,
        "managed": up.managed,
        "restarts": up.restarts,
        "outstanding": up.outstanding,
        "ejected": up.ejected,
        "last_failure": up.last_failure,
        "retry_at": round(up.retry_at, 3) if up.retry_at is not None else None,
        "log_tail": [mask_text(line) for line in readings.log_tails.get(up.name, ())],
        "engine": (
            {
                "running": load.running,
                "waiting": load.waiting,
                "kv_cache": load.kv_cache,
                "generation_tokens": load.generation_tokens,
                "prompt_tokens": load.prompt_tokens,
                "at": round(up.load_at, 3),
            }
            if load is not None
            else None
        ),
    }


def _gpus(core: Core, readings: Readings) -> dict[str, Any]:
    use = readings.gpus
    holders: dict[int, list[str]] = {}
    for up in core.registry.all():
        spec = up.spec
        if isinstance(spec, EngineSpec) and spec.gpus and up.state is not State.UNLOADED:
            for index in spec.gpus:
                holders.setdefault(index, []).append(up.name)
    devices = [
        {
            "index": gpu.index,
            "name": gpu.name,
            "memory_used_mib": gpu.memory_used_mib,
            "memory_total_mib": gpu.memory_total_mib,
            "utilization_pct": gpu.utilization_pct,
            "engines": holders.get(gpu.index, []),
        }
        for gpu in use.gpus or ()
    ]
    return {"available": use.gpus is not None, "reason": use.reason, "devices": devices}


def _keys(core: Core) -> list[dict[str, Any]]:
    """Requests and tokens of each key (by name) since the gateway started."""
    metrics = core.metrics
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        found = rows.get(name)
        if found is None:
            found = rows[name] = {
                "name": name, "requests": 0, "errors": 0, "prompt_tokens": 0,
                "completion_tokens": 0,
            }  # fmt: skip
        return found

    for (name, _, status), count in metrics.key_requests.items():
        counted = row(name)
        counted["requests"] += count
        if status >= 500:
            counted["errors"] += count
    for (name, _), (prompt, completion) in metrics.key_tokens.items():
        counted = row(name)
        counted["prompt_tokens"] += prompt
        counted["completion_tokens"] += completion
    return [rows[name] for name in sorted(rows)]
