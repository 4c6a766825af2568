"""Pure: the fleet's engines as Prometheus HTTP service discovery (`GET /fleet/targets`).

Prometheus' `http_sd_configs` reads a JSON list of target groups
(https://prometheus.io/docs/prometheus/latest/http_sd/): `{"targets": ["host:port"],
"labels": {...}}`. Each engine of the fleet is one group of its own, because its labels
differ: `deployment`, `replica`, `upstream` (its name, `qwen-0`, as the gateway's own
`fleet_upstream_*` metrics label it; vLLM's own `engine` label, the engine core's index,
stays as vLLM sets it), `model` (the deployment's
`model`) and `node` (the machine the gateway runs on), so a dashboard can sum vLLM's own
metrics by deployment without knowing which port or socket each engine has.

Where Prometheus scrapes each engine:
- an engine on TCP (`listen: tcp`): its own `host:port` and vLLM's `/metrics`. An engine
  bound to every interface (`0.0.0.0`, `::`) is given the host Prometheus reached the
  gateway by, which is this machine too;
- an engine on a Unix socket, which Prometheus cannot open, or every engine with
  `via_gateway`: the gateway's own address, and `__metrics_path__`
  `/fleet/engines/<name>/metrics`, the gateway's proxy of that engine's `/metrics`;
- a remote endpoint (`endpoints:`, a vLLM running elsewhere): its URL's host and port, its
  path + `/metrics` (vLLM serves `/metrics` beside `/health`, which the fleet probes at
  the same base), and `__scheme__` `https` for an https URL.

Every upstream the gateway routes to is listed, whatever its state: an engine that is not
running (failed, unloaded) shows as a target that is down, which is what it is.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from vllm_fleet.plan import EngineSpec, RemoteSpec
from vllm_fleet.registry import Registry, Upstream

_ANY_HOST = ("0.0.0.0", "::", "")


def scrape_targets(
    registry: Registry, gateway_address: str, via_gateway: bool, node: str, tls: bool = False
) -> list[dict[str, Any]]:
    """One HTTP SD target group per upstream, in the registry's order.

    `gateway_address`: `host:port` Prometheus reaches the gateway by (the request's
    `Host`); `via_gateway`: scrape every engine through the gateway's proxy route, for a
    Prometheus that cannot reach the engines' ports; `node`: this machine's name; `tls`:
    the gateway serves HTTPS (`gateway.tls`), so what goes through it is scraped so."""
    return [_group(up, registry, gateway_address, via_gateway, node, tls) for up in registry.all()]


def engine_metrics_path(name: str) -> str:
    """The gateway's route that proxies engine `name`'s `/metrics`."""
    return f"/fleet/engines/{quote(name, safe='')}/metrics"


def _group(
    up: Upstream, registry: Registry, gateway_address: str, via_gateway: bool, node: str, tls: bool
) -> dict[str, Any]:
    dep = registry.config.deployments.get(up.deployment)
    labels = {
        "deployment": up.deployment,
        "replica": str(up.spec.replica),
        "upstream": up.name,
        "model": dep.model if dep is not None else "",
        "node": node,
    }
    spec = up.spec
    if via_gateway or (isinstance(spec, EngineSpec) and spec.uds is not None):
        target = gateway_address
        labels["__metrics_path__"] = engine_metrics_path(up.name)
        if tls:
            labels["__scheme__"] = "https"
    elif isinstance(spec, EngineSpec):
        target = _host_port(_reachable(spec.host, gateway_address), spec.port)
        labels["__metrics_path__"] = "/metrics"
    else:
        target, path, scheme = _remote(spec)
        labels["__metrics_path__"] = path
        if scheme == "https":
            labels["__scheme__"] = scheme
    return {"targets": [target], "labels": labels}


def _reachable(host: str, gateway_address: str) -> str:
    """The engine's host, or for an engine on every interface the gateway's host (the
    same machine, by the name Prometheus already reaches it by)."""
    if host not in _ANY_HOST:
        return host
    gateway_host = urlsplit(f"//{gateway_address}").hostname
    return gateway_host or "127.0.0.1"


def _host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port is not None else host


def _remote(spec: RemoteSpec) -> tuple[str, str, str]:
    """A remote endpoint's `host:port` (the scheme's port when the URL has none), metrics
    path and scheme."""
    url = urlsplit(spec.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return _host_port(url.hostname or "", port), f"{url.path.rstrip('/')}/metrics", url.scheme
