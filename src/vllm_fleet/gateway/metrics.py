"""Prometheus metrics of one gateway, in a registry of its own (no module globals)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_fleet.registry import Registry, State


class _UpstreamCollector(Collector):
    """Upstream states and outstanding requests, read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(
            "fleet_upstream_ready",
            "1 when the upstream is ready",
            labels=["deployment", "upstream"],
        )
        state = GaugeMetricFamily(
            "fleet_upstream_state",
            "1 for the upstream's current state",
            labels=["deployment", "upstream", "state"],
        )
        outstanding = GaugeMetricFamily(
            "fleet_upstream_outstanding_requests",
            "requests in flight to the upstream",
            labels=["deployment", "upstream"],
        )
        restarts = GaugeMetricFamily(
            "fleet_upstream_restarts", "restarts of the engine", labels=["deployment", "upstream"]
        )
        for up in self.registry.all():
            labels = [up.deployment, up.name]
            ready.add_metric(labels, 1.0 if up.state is State.READY else 0.0)
            for s in State:
                state.add_metric([*labels, s.value], 1.0 if up.state is s else 0.0)
            outstanding.add_metric(labels, float(up.outstanding))
            restarts.add_metric(labels, float(up.restarts))
        yield ready
        yield state
        yield outstanding
        yield restarts


class GatewayMetrics:
    def __init__(self, registry: Registry) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fleet_requests",
            "requests answered by the gateway",
            ["deployment", "style", "status"],
            registry=self.prometheus,
        )
        self.in_flight = Gauge(
            "fleet_requests_in_flight",
            "requests being proxied",
            ["deployment"],
            registry=self.prometheus,
        )
        self.prometheus.register(_UpstreamCollector(registry))

    def render(self) -> bytes:
        return generate_latest(self.prometheus)
