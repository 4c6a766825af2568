"""Sending the workloads: streamed chat completions over aiohttp, timed to the first token
and to the end, each answer's replica read from `X-Fleet-Upstream` where the front end
sends it (the fleet does; nginx and vllm-router do not)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.routing.workload import Conversation, Shape


@dataclass
class Sample:
    ttft: float  # seconds to the first content token
    latency: float  # seconds to the end of the answer
    ok: bool
    replica: str | None = None
    error: str | None = None


async def chat(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
) -> Sample:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first: float | None = None
    try:
        async with session.post(url, json=body) as resp:
            replica = resp.headers.get("x-fleet-upstream")
            if resp.status != 200:
                text = (await resp.text())[:300]
                return Sample(0.0, time.perf_counter() - start, False, replica, text)
            async for line in resp.content:
                if first is None and line.startswith(b"data: {") and _has_content(line[6:]):
                    first = time.perf_counter()
            end = time.perf_counter()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Sample(0.0, time.perf_counter() - start, False, None, repr(exc))
    if first is None:
        return Sample(0.0, end - start, False, replica, "no content token in the stream")
    return Sample(first - start, end - start, True, replica)


def _has_content(data: bytes) -> bool:
    """A chunk with text in it (vLLM's first chunk carries the role and empty content)."""
    try:
        choices = json.loads(data).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


async def _drive(
    worker: Callable[[aiohttp.ClientSession], Awaitable[None]], concurrency: int
) -> float:
    """Run `concurrency` copies of `worker` on one client session; the wall time."""
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - start


async def run_conversations(
    url: str, model: str, convs: list[Conversation], shape: Shape
) -> tuple[list[Sample], float]:
    """`shape.concurrency` conversations at a time, each one's turns in order; the samples
    and the wall time."""
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in convs:
        conv.replicas.clear()
        queue.put_nowait(conv)
    samples: list[Sample] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            conv = queue.get_nowait()
            for turn in range(len(conv.users)):
                sample = await chat(session, url, model, conv.messages(turn), shape.max_tokens)
                samples.append(sample)
                conv.replicas.append(sample.replica or "?")

    return samples, await _drive(worker, shape.concurrency)


async def run_interleaved(
    url: str, model: str, convs: list[Conversation], shape: Shape
) -> tuple[list[Sample], float]:
    """Every conversation open at once, `shape.concurrency` requests in flight: the
    conversations take turns (first come, first served), so between two turns of one
    conversation the others ask theirs, as many users with a think time would."""
    ready: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in convs:
        conv.replicas.clear()
        ready.put_nowait(conv)
    samples: list[Sample] = []
    left = sum(len(c.users) for c in convs)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            try:
                conv = await asyncio.wait_for(ready.get(), timeout=1.0)
            except TimeoutError:
                continue  # every open conversation is in flight elsewhere
            left -= 1
            turn = len(conv.replicas)
            sample = await chat(session, url, model, conv.messages(turn), shape.max_tokens)
            samples.append(sample)
            conv.replicas.append(sample.replica or "?")
            if len(conv.replicas) < len(conv.users):
                ready.put_nowait(conv)

    return samples, await _drive(worker, shape.concurrency)


async def run_requests(
    url: str, model: str, requests: list[list[dict[str, Any]]], shape: Shape
) -> tuple[list[Sample], float]:
    """The control workload: one-turn requests, `shape.concurrency` at a time."""
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    for messages in requests:
        queue.put_nowait(messages)
    samples: list[Sample] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            samples.append(await chat(session, url, model, queue.get_nowait(), shape.max_tokens))

    return samples, await _drive(worker, shape.concurrency)
