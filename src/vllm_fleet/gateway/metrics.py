"""Prometheus metrics of one gateway, in a registry of its own (no module globals).

Nothing on the request path touches prometheus_client: requests are counted in a plain
dict and in-flight requests are the upstreams' outstanding counts, both read at scrape
time by collectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vllm_fleet.registry import Registry, State


class _UpstreamCollector(Collector):
    """Upstream states, outstanding requests and ejections, read from the registry at
    scrape time, and the failovers the request path counted."""

    def __init__(self, registry: Registry, failovers: dict[tuple[str, str], int]) -> None:
        self.registry = registry
        self.failovers = failovers

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
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
        ejected = GaugeMetricFamily(
            "fleet_upstream_ejected",
            "1 while the gateway keeps the upstream out of the rotation (it failed a request "
            "before answering; back when a health check passes)",
            labels=["deployment", "upstream"],
        )
        failovers = CounterMetricFamily(
            "fleet_upstream_failovers",
            "requests the upstream failed before their first byte (refused, connect timeout, "
            "closed unanswered) that went on to another replica",
            labels=["deployment", "upstream"],
        )
        counted = self.failovers
        stalls = CounterMetricFamily(
            "fleet_engine_stalls",
            "times the engine was found stalled (busy, no token progress) and restarted",
            labels=["deployment", "upstream"],
        )
        for up in self.registry.all():
            labels = [up.deployment, up.name]
            ready.add_metric(labels, 1.0 if up.state is State.READY else 0.0)
            for s in State:
                state.add_metric([*labels, s.value], 1.0 if up.state is s else 0.0)
            outstanding.add_metric(labels, float(up.outstanding))
            restarts.add_metric(labels, float(up.restarts))
            ejected.add_metric(labels, 0.0 if up.ejected is None else 1.0)
            failovers.add_metric(labels, float(counted.get((up.deployment, up.name), 0)))
            if up.managed:
                stalls.add_metric(labels, float(up.stalls))
        yield ready
        yield state
        yield outstanding
        yield restarts
        yield ejected
        yield failovers
        yield stalls


class _RequestCollector(Collector):
    """Requests answered (by deployment, URL style, status) and requests in flight."""

    def __init__(self, registry: Registry, counts: dict[tuple[str, str, int], int]) -> None:
        self.registry = registry
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        requests = CounterMetricFamily(
            "fleet_requests",
            "requests answered by the gateway",
            labels=["deployment", "style", "status"],
        )
        for (dep_id, style, status), count in sorted(self.counts.items()):
            requests.add_metric([dep_id, style, str(status)], float(count))
        in_flight = GaugeMetricFamily(
            "fleet_requests_in_flight", "requests being proxied", labels=["deployment"]
        )
        for dep_id, ups in self.registry.by_deployment.items():
            in_flight.add_metric([dep_id], float(sum(u.outstanding for u in ups)))
        loaded = GaugeMetricFamily(
            "fleet_adapter_engines_loaded",
            "engines of its base that hold a LoRA adapter (ready ones)",
            labels=["deployment", "base"],
        )
        for a_id, adapter in self.registry.config.adapters.items():
            ups = self.registry.upstreams(adapter.base)
            busy = sum(u.adapter_inflight.get(a_id, 0) for u in ups)
            in_flight.add_metric([a_id], float(busy))
            held = sum(1 for u in ups if a_id in u.adapters and u.state is State.READY)
            loaded.add_metric([a_id, adapter.base], float(held))
        yield requests
        yield in_flight
        if self.registry.config.adapters:
            yield loaded


class _FleetCollector(Collector):
    """The fleet file's generation, reloads by result, engines started and stopped."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        registry = self.registry
        yield GaugeMetricFamily(
            "fleet_generation",
            "the fleet file's generation: 1 at `fleet up`, one more per reload applied",
            value=float(registry.fleet.get("generation", 1)),
        )
        reloads = CounterMetricFamily(
            "fleet_reloads",
            "reloads of the fleet file, by result (applied, failed, invalid, refused, "
            "unchanged, interrupted)",
            labels=["result"],
        )
        for result, count in sorted(registry.reloads.items()):
            reloads.add_metric([result], float(count))
        yield reloads
        starts = CounterMetricFamily(
            "fleet_engine_starts",
            "engine processes started, by reason (fleet up, reload, restart)",
            labels=["deployment", "reason"],
        )
        for (dep_id, reason), count in sorted(registry.engine_starts.items()):
            starts.add_metric([dep_id, reason], float(count))
        yield starts
        stops = CounterMetricFamily(
            "fleet_engine_stops",
            "engine processes stopped by the fleet, by reason (reload, failure, shutdown)",
            labels=["deployment", "reason"],
        )
        for (dep_id, reason), count in sorted(registry.engine_stops.items()):
            stops.add_metric([dep_id, reason], float(count))
        yield stops


class _KeyCollector(Collector):
    """Requests and tokens by key name (never the key) and deployment."""

    def __init__(self, requests: dict[tuple[str, str, int], int], tokens: KeyTokens) -> None:
        self.requests = requests
        self.tokens = tokens

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "fleet_key_requests",
            "requests by client key name, deployment and status",
            labels=["key", "deployment", "status"],
        )
        for (key, dep_id, status), count in sorted(self.requests.items()):
            requests.add_metric([key, dep_id, str(status)], float(count))
        yield requests
        tokens = CounterMetricFamily(
            "fleet_key_tokens",
            "tokens the engines reported used (usage), by client key name, deployment and "
            "kind (prompt, completion)",
            labels=["key", "deployment", "kind"],
        )
        for (key, dep_id), (prompt, completion) in sorted(self.tokens.items()):
            tokens.add_metric([key, dep_id, "prompt"], float(prompt))
            tokens.add_metric([key, dep_id, "completion"], float(completion))
        yield tokens


# (key name, deployment) -> [prompt tokens, completion tokens]
KeyTokens = dict[tuple[str, str], list[int]]


class ServerGauges(Protocol):
    """What ServerCollector reads from a server."""

    @property
    def connection_count(self) -> int: ...
    @property
    def waiting_count(self) -> int: ...
    @property
    def max_connections(self) -> int: ...


class ServerCollector(Collector):
    """The server's own gauges: client connections, the limit, requests waiting
    for a turn (pacing), read from the server at scrape time."""

    def __init__(self, server: ServerGauges) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily]:
        server = self.server
        yield GaugeMetricFamily(
            "fleet_client_connections", "client connections open", value=server.connection_count
        )
        yield GaugeMetricFamily(
            "fleet_client_connections_limit",
            "client connections served at once (gateway.max_connections)",
            value=server.max_connections,
        )
        yield GaugeMetricFamily(
            "fleet_requests_waiting",
            "complete requests waiting for their turn to start (a burst being paced)",
            value=server.waiting_count,
        )


class _Stats(Protocol):
    def stats(self) -> dict[str, Any]: ...


# A routing policy's counters (gateway/policies/) and what each outcome means.
ROUTING_OUTCOMES = ("hits", "spills", "misses", "kept", "unkeyed")


class _RoutingCollector(Collector):
    """What each deployment's routing policy decided (`routing:` other than the default),
    read from the policies at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        decisions = CounterMetricFamily(
            "fleet_routing_decisions",
            "requests by what their deployment's routing policy met: prefix hits (sent to "
            "the replica holding their prompt's prefix), spills (that one was over the "
            "load bound), misses (no prefix seen before); sessions kept, spills, unkeyed",
            labels=["deployment", "policy", "outcome"],
        )
        blocks = GaugeMetricFamily(
            "fleet_routing_prefix_blocks",
            "prompt blocks the prefix policy remembers a replica for",
            labels=["deployment"],
        )
        for dep_id, policy in self.metrics.policies.items():
            stats = policy.stats()
            name = str(stats.get("policy", ""))
            for outcome in ROUTING_OUTCOMES:
                if outcome in stats:
                    decisions.add_metric([dep_id, name, outcome], float(stats[outcome]))
            if "blocks" in stats:
                blocks.add_metric([dep_id], float(stats["blocks"]))
        yield decisions
        yield blocks


class GatewayMetrics:
    def __init__(self, registry: Registry) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        # (deployment, style, status) -> requests answered; the request path adds to it.
        self.requests: dict[tuple[str, str, int], int] = {}
        # (deployment, upstream) -> requests it failed before their first byte that went
        # on to another replica; the request path adds to it.
        self.failovers: dict[tuple[str, str], int] = {}
        self.prometheus.register(_RequestCollector(registry, self.requests))
        self.prometheus.register(_UpstreamCollector(registry, self.failovers))
        self.prometheus.register(_FleetCollector(registry))
        # (key name, deployment, status) -> requests; (key name, deployment) -> tokens.
        self.key_requests: dict[tuple[str, str, int], int] = {}
        self.key_tokens: KeyTokens = {}
        self.prometheus.register(_KeyCollector(self.key_requests, self.key_tokens))
        # Deployment -> its routing policy (the core in force sets it).
        self.policies: Mapping[str, _Stats] = {}
        self.prometheus.register(_RoutingCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.prometheus)
