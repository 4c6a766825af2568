"""The fake engine's `/metrics`: the route, and vLLM's request gauges and token counters,
under vLLM's names and labels, read from the engine's counters at scrape time."""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METRICS: web.AppKey[CollectorRegistry] = web.AppKey("metrics", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS])
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


class Counted(Protocol):
    """What the collector reads from the fake engine."""

    names: list[str]
    in_flight: int
    waiting: int
    generation_tokens: int
    prompt_tokens: int
    started: float


class VllmStats(Collector):
    """vLLM's request gauges and token counters (vllm/v1/metrics/loggers.py), read from
    the engine at scrape time."""

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
        yield from (running, waiting, prompt, generated)
