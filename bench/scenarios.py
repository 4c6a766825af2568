"""The scenarios, run against one front end at a time from the load generator's loop.

(a) one client, non-streaming, small request: latency per request;
(b) many concurrent streams: time to first token, inter-token gaps, tokens/s, errors;
(c) non-streaming requests per second at a fixed number of concurrent clients;
(d) thousands of slow streams held open at once: the proxy's peak memory.

Each returns a flat dict of metric name -> number for one repetition. The proxy's CPU
time is read from /proc around each scenario, so its cost per token or per request is
measured under exactly the load that was driven.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from bench import procs
from bench.loadgen import Client, Result, connect, post

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    repeats: int = 5
    idle_repeats: int = 2
    # (b)'s time to first token varies most from one repetition to the next on a shared
    # machine: more repetitions for a steadier median.
    stream_repeats: int = 9
    # (a)
    single_seconds: float = 2.0
    single_tokens: int = 16
    # (b)
    streams: int = 256
    stream_tokens: int = 256
    stream_delay: float = 0.02
    # (c)
    rps_clients: int = 64
    rps_seconds: float = 3.0
    rps_warmup: float = 0.5
    # (d)
    idle_streams: int = 2000
    idle_tokens: int = 8
    idle_delay: float = 1.0
    timeout: float = 60.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            repeats=1,
            idle_repeats=1,
            stream_repeats=1,
            single_seconds=0.5,
            streams=32,
            stream_tokens=32,
            stream_delay=0.01,
            rps_clients=16,
            rps_seconds=0.5,
            rps_warmup=0.2,
            idle_streams=200,
            idle_tokens=3,
            idle_delay=0.5,
            timeout=20.0,
        )


@dataclass
class Target:
    """One front end as the load generator sees it: where to send, whose CPU to read."""

    name: str
    port: int
    prefix: str  # "" for the engine itself, "/bench" for a proxy's path route
    pids: Callable[[], list[int]]  # the proxy's processes (none for direct)
    upstream_pids: list[int]
    headers: bytes = b""  # header lines every request carries (a key)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def chat_body(tokens: int, stream: bool, delay: float = 0.0) -> bytes:
    body: dict[str, object] = {
        "model": "bench",
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        body["bench_token_delay"] = delay
    return json.dumps(body).encode()


def payload(target: Target, body: bytes) -> bytes:
    return post(HOST, target.port, f"{target.prefix}/v1/chat/completions", body, target.headers)


@contextmanager
def measured(target: Target, into: dict[str, float]) -> Iterator[None]:
    """Wall time and CPU seconds of the proxy and of this process across the block; the
    collector stays off inside it so the load generator does not pause mid-measurement."""
    pids = target.pids()
    cpu0 = procs.cpu_seconds(pids)
    up0 = procs.cpu_seconds(target.upstream_pids)
    busy0 = procs.machine_busy_seconds()
    self0 = time.process_time()
    wall0 = time.perf_counter()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        into["wall_s"] = time.perf_counter() - wall0
        into["proxy_cpu_s"] = procs.cpu_seconds(pids) - cpu0 if pids else 0.0
        into["loadgen_cpu_s"] = time.process_time() - self0
        into["upstream_cpu_s"] = procs.cpu_seconds(target.upstream_pids) - up0
        into["proxy_core_util"] = into["proxy_cpu_s"] / into["wall_s"]
        ours = into["loadgen_cpu_s"] + into["upstream_cpu_s"]
        into["load_core_util"] = ours / into["wall_s"]
        # Other processes on the machine (noise): all busy CPU time minus ours.
        other = procs.machine_busy_seconds() - busy0 - ours - into["proxy_cpu_s"]
        into["background_util"] = max(0.0, other) / into["wall_s"]
    gc.collect()


async def open_clients(
    target: Target, count: int, record_gaps: bool = True, batch: int = 100
) -> list[Client]:
    """Open `count` keep-alive connections, `batch` at a time (no SYN storm)."""
    clients: list[Client] = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        clients.extend(
            await asyncio.gather(*(connect(HOST, target.port, record_gaps) for _ in range(size)))
        )
    return clients


def close_all(clients: Sequence[Client]) -> None:
    for client in clients:
        client.close()


async def reconnected(client: Client, target: Target) -> Client:
    """`client`, or a new connection where the server ended the old one after an answer
    (as any HTTP client would; nginx does so every `keepalive_requests` requests)."""
    if client.usable:
        return client
    client.close()
    return await connect(HOST, target.port, client.record_gaps)


def failed(result: Result, tokens: int | None = None) -> bool:
    if not result.ok:
        return True
    return tokens is not None and (result.tokens != tokens or not result.done)


# ---------------------------------------------------------------- (a) one client


async def single_client(target: Target, s: Settings) -> dict[str, float]:
    client = await connect(HOST, target.port)
    request = payload(target, chat_body(s.single_tokens, stream=False))
    for _ in range(20):  # warm the proxy's connection to the engine
        client = await reconnected(client, target)
        await client.request(request, s.timeout)
    latencies: list[float] = []
    errors = 0
    out: dict[str, float] = {}
    with measured(target, out):
        deadline = time.perf_counter() + s.single_seconds
        while time.perf_counter() < deadline and len(latencies) < 1_000_000:
            client = await reconnected(client, target)
            result = await client.request(request, s.timeout)
            if failed(result):
                errors += 1
            else:
                latencies.append(result.t_end - result.t_send)
    client.close()
    out.update(
        requests=len(latencies),
        errors=errors,
        lat_p50_ms=percentile(latencies, 50) * 1e3,
        lat_p99_ms=percentile(latencies, 99) * 1e3,
    )
    return out


# ---------------------------------------------------------------- (b) concurrent streams


async def streams(target: Target, s: Settings) -> dict[str, float]:
    clients = await open_clients(target, s.streams)
    # Warm-up, not measured: the same number of short streams at once, so the proxy's
    # connections to the engine are open as in steady serving.
    warm = payload(target, chat_body(4, stream=True, delay=s.stream_delay))
    await asyncio.gather(*(c.request(warm, s.timeout) for c in clients))
    clients = [await reconnected(c, target) for c in clients]
    request = payload(target, chat_body(s.stream_tokens, stream=True, delay=s.stream_delay))
    out: dict[str, float] = {}
    with measured(target, out):
        results = await asyncio.gather(*(c.request(request, s.timeout) for c in clients))
    close_all(clients)
    good = [r for r in results if not failed(r, s.stream_tokens)]
    ttft = [r.t_first - r.t_send for r in results if r.t_first is not None]
    gaps = [g for r in results for g in r.gaps]
    tokens = sum(r.tokens for r in results)
    span = max(r.t_end for r in results) - min(r.t_send for r in results)
    out.update(
        streams=len(results),
        errors=len(results) - len(good),
        tokens=tokens,
        ttft_p50_ms=percentile(ttft, 50) * 1e3,
        ttft_p99_ms=percentile(ttft, 99) * 1e3,
        gap_p99_ms=percentile(gaps, 99) * 1e3,
        tokens_per_s=tokens / span if span > 0 else 0.0,
        proxy_cpu_per_1k_tokens_s=out["proxy_cpu_s"] / tokens * 1000 if tokens else 0.0,
    )
    return out


# ---------------------------------------------------------------- (c) requests per second


async def _closed_loop(
    target: Target, clients: list[Client], request: bytes, seconds: float, timeout: float
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one(index: int) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            client = clients[index] = await reconnected(clients[index], target)
            result = await client.request(request, timeout)
            if failed(result):
                errors += 1
            else:
                latencies.append(result.t_end - result.t_send)

    await asyncio.gather(*(one(i) for i in range(len(clients))))
    return latencies, errors


UpstreamStats = Callable[[bool], Awaitable[dict[str, int]]]


async def requests_per_second(
    target: Target, s: Settings, upstream_stats: UpstreamStats | None = None
) -> dict[str, float]:
    clients = await open_clients(target, s.rps_clients)
    request = payload(target, chat_body(s.single_tokens, stream=False))
    await _closed_loop(target, clients, request, s.rps_warmup, s.timeout)
    if upstream_stats is not None:
        await upstream_stats(True)
    out: dict[str, float] = {}
    with measured(target, out):
        latencies, errors = await _closed_loop(target, clients, request, s.rps_seconds, s.timeout)
    close_all(clients)
    if upstream_stats is not None:  # how many connections the proxy opened to the engine
        opened = (await upstream_stats(False)).get("connections", 0)
        out["upstream_connections"] = max(0, opened - 1)  # not the one asking for the stats
    rps = len(latencies) / out["wall_s"]
    out.update(
        requests=len(latencies),
        errors=errors,
        rps=rps,
        lat_p50_ms=percentile(latencies, 50) * 1e3,
        lat_p99_ms=percentile(latencies, 99) * 1e3,
        proxy_cpu_per_1k_req_s=out["proxy_cpu_s"] / len(latencies) * 1000 if latencies else 0.0,
    )
    return out


# ---------------------------------------------------------------- (d) many slow streams


async def idle_streams(
    target: Target, s: Settings, upstream_stats: UpstreamStats
) -> dict[str, float]:
    pids = target.pids()
    base_rss = procs.rss_bytes(pids) if pids else 0
    await upstream_stats(True)  # reset the upstream's peak-concurrency counter
    clients = await open_clients(target, s.idle_streams, record_gaps=False)
    request = payload(target, chat_body(s.idle_tokens, stream=True, delay=s.idle_delay))
    out: dict[str, float] = {}
    with procs.Sampler(pids) as sampler, measured(target, out):
        tasks: list[asyncio.Future[Result]] = []
        for start in range(0, len(clients), 200):  # ramp up over a fraction of a second
            batch = clients[start : start + 200]
            tasks.extend(asyncio.ensure_future(c.request(request, s.timeout)) for c in batch)
            await asyncio.sleep(0.02)
        results = await asyncio.gather(*tasks)
    close_all(clients)
    stats = await upstream_stats(False)
    good = [r for r in results if not failed(r, s.idle_tokens)]
    out.update(
        streams=len(results),
        errors=len(results) - len(good),
        peak_concurrent=stats.get("peak_active", 0),
        rss_idle_mb=base_rss / 2**20,
        rss_peak_mb=sampler.peak / 2**20,
    )
    return out
