"""The fake engine's `/metrics`: the route, and vLLM's request gauges, token counters and
request timings, under vLLM's names, help texts, labels and bucket boundaries
(vllm/v1/metrics/loggers.py and buckets.py, vLLM 0.32), read from the engine at scrape time.

Timings are what the fake does, measured as vLLM measures them: time to first token from
the request's arrival (before any wait for a batch or a prefill) to its first token;
end-to-end latency and `vllm:request_success` (by `finished_reason`) once the engine has
generated its last token, or aborted it (a sleep aborts the requests in flight). A client
that goes away before the end is not counted, as vLLM does not count it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

METRICS: web.AppKey[CollectorRegistry] = web.AppKey("metrics", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


# vllm/v1/metrics/buckets.py: TIME_TO_FIRST_TOKEN_BUCKETS and REQUEST_LATENCY_BUCKETS.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vllm/v1/engine/__init__.py FINISH_REASON_STRINGS: every one is exported from the start.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class Histogram:
    """One histogram's observations: per-bucket counts (the last one past every bound)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le`: value <= bound
        self.total += value

    def family(self, name: str, documentation: str, values: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=["engine", "model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), float(cumulative)))
        family.add_metric(values, buckets, self.total)
        return family


def _le(bound: float) -> str:
    """A bucket's `le` as prometheus_client writes it (`0.5`, `10.0`, `+Inf`)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass
class RequestTimes:
    """Time to first token, end-to-end latency and requests finished by reason."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))

    def first_token(self, arrival: float) -> None:
        """The request that arrived at `arrival` (time.monotonic()) got its first token."""
        self.ttft.observe(time.monotonic() - arrival)

    def finish(self, reason: str, arrival: float) -> None:
        """The engine is done with the request: `stop`, `length` or `abort`."""
        self.e2e.observe(time.monotonic() - arrival)
        self.finished[reason] += 1


class Counted(Protocol):
    """What the collector reads from the fake engine."""

    names: list[str]
    in_flight: int
    waiting: int
    generation_tokens: int
    prompt_tokens: int
    started: float
    times: RequestTimes


class VllmStats(Collector):
    """vLLM's request gauges, token counters and request timings
    (vllm/v1/metrics/loggers.py), read from the engine at scrape time."""

    def __init__(self, engine: Counted) -> None:
        self.engine = engine

    def collect(self) -> Any:
        engine = self.engine
        labels = ["engine", "model_name"]
        values = ["0", engine.names[0]]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=labels,
        )
        running.add_metric(values, float(engine.in_flight))
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=labels,
        )
        waiting.add_metric(values, float(engine.waiting))
        generated = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        generated.add_metric(values, float(engine.generation_tokens), created=engine.started)
        prompt = CounterMetricFamily(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels
        )
        prompt.add_metric(values, float(engine.prompt_tokens), created=engine.started)
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*labels, "finished_reason"],
        )
        for reason, count in engine.times.finished.items():
            success.add_metric([*values, reason], float(count), created=engine.started)
        ttft = engine.times.ttft.family(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            values,
        )
        e2e = engine.times.e2e.family(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            values,
        )
        yield from (running, waiting, prompt, generated, success, ttft, e2e)
