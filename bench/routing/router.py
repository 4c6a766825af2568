"""vllm-router, the router the routing benchmark measures the fleet's prefix routing against.

vllm-router is vllm-project's router (github.com/vllm-project/router, adapted from SGLang's
router): Rust behind a thin Python launcher. `make router-env` installs the PyPI wheel
`vllm-router` 0.1.17 (requirements/router.in) into `.venv-router`. Its `bin/vllm-router` is a
console script (`vllm_router.launch_router:main`) running the Rust server in-process, so the
pid started is the router's (it retitles itself `vllm::router`). It has no `--version`.

What 0.1.17 does, seen in front of two fake engines (vllm_fleet.testing.fake_vllm) behind a
logging proxy:
- Start: `--worker-urls` is a static list (a trailing `/` is dropped). It GETs each worker's
  `/health` until at least ONE answers 200, sleeping `--worker-startup-check-interval` (30 s
  by default) between rounds, and only then binds its port. It counts every listed worker
  healthy from then on, even one that never answered: requests routed there get a 500 (after
  5 retries) until 10 failures open its circuit. Later: GET `/health` every 60 s. It never
  asks a worker for its model (no /v1/models, /get_model_info, /get_server_info): each
  worker's model is "unknown", and one cache_aware tree covers every model name.
- Its own endpoints: `/liveness` ("OK"), `/health` ("All servers healthy"), `/readiness`
  (`{"status":"ready","healthy_workers":N,"total_workers":N}`), `/workers`, `/list_workers`
  (`{"urls":[...]}`); other paths (`/v1/models`, `/metrics`, ...) are proxied to a worker.
  Prometheus on `--prometheus-port` (default 29000; a port in use makes it panic and exit):
  `vllm_router_policy_decisions_total{worker}`, `vllm_router_prefix_routing_decisions_total
  {outcome="prefix_hit"|"prefix_miss"}`, `vllm_router_running_requests{worker}`, ...
- A request: the body is re-serialized with defaults added (`"stream": false, "logprobs":
  false, "skip_special_tokens": true, "ignore_eos": false, "include_reasoning": true`, ...);
  `model` is passed through as sent (never rewritten: a name the engine does not serve gets
  its 404; none stays none). Client headers reach the worker; the worker's headers (e.g.
  `X-Fake-Engine`) come back, plus the router's `x-request-id` and CORS headers. SSE is
  relayed as it arrives.
- cache_aware (only; round_robin and random forward at once) first has EVERY worker tokenize
  the prompt, concurrently: POST `/v1/chat/completions/render` (`/v1/completions/render`)
  with the whole rewritten body, reading `{"token_ids": [...]}` (vLLM serves it); if that
  fails (the fake engine: 404), POST `/tokenize` with `{"model", "continue_final_message":
  false, "messages"}` (completions: `{"model", "prompt"}`), reading `tokens`. So each request
  costs N renders for N workers, plus N tokenizes on engines without render; with neither it
  routes without its tree. The tree holds those ids, so it is as good as the engine's
  tokenizer: ids 0..n-1 (the fake engine's `/tokenize` before fake_prefix.py) make any prompt
  "match" any longer one; with word ids, prompts sharing only the rendered `user:` still
  match at 1/3 when short (above the 0.3 threshold).
- cache_aware picks the longest token-prefix match when its match rate exceeds
  `--cache-threshold`, else the least-loaded worker (ties: the first in its own order, as
  `/list_workers` shows it, which changes between runs; serial requests on an idle router
  all land there); shortest queue instead while (max - min load) > `--balance-abs-threshold`
  and max > min x `--balance-rel-threshold`. So below 64 requests in flight a prefix that
  first arrives while loads are equal joins the first worker, and stays with its match.
- SIGTERM: a graceful shutdown that waits for the requests in flight (a 6 s stream ran to
  its end), so stop it with SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import aiohttp

from bench.procs import free_port

HOST = "127.0.0.1"
ROUTER_VENV = ".venv-router"  # the Makefile's ROUTER_VENV default; the variable overrides it
BINARY = "vllm-router"
POLICIES = (
    "random",
    "round_robin",
    "cache_aware",
    "kv_aware",
    "power_of_two",
    "consistent_hash",
    "sticky_least_loaded",
)


def router_binary(root: Path) -> Path | None:
    """`<root>/.venv-router/bin/vllm-router` (or under $ROUTER_VENV), None when not installed."""
    venv = root / os.environ.get("ROUTER_VENV", ROUTER_VENV)  # an absolute $ROUTER_VENV wins
    path = venv / "bin" / BINARY
    return path if path.is_file() and os.access(path, os.X_OK) else None


def router_command(
    binary: Path,
    port: int,
    workers: list[str],
    policy: str = "cache_aware",
    *,
    metrics_port: int | None = None,
) -> list[str]:
    """The argv of a vllm-router on HOST:`port` in front of `workers` (base URLs).

    `metrics_port` is its Prometheus exporter's (`/metrics` there); it must be free, or the
    router panics at start, and its own default (29000) would clash between two routers. None:
    a port free now, picked like `bench.procs.free_port`.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown vllm-router policy {policy!r}; choose one of {POLICIES}")
    if not workers:
        raise ValueError("vllm-router needs at least one worker URL")
    return [
        str(binary),
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        *workers,
        "--policy",
        policy,
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(free_port() if metrics_port is None else metrics_port),
        # It binds only after a round of /health checks finds a worker up, and sleeps this
        # long between rounds (default 30 s; --worker-startup-timeout-secs stays 600).
        "--worker-startup-check-interval",
        "1",
        # Left at their defaults (0.1.17's CLI defaults; the Python Router docstring lists
        # older ones):
        #   cache_aware: --cache-threshold 0.3 (prefix match rate above which the best match
        #     wins), --balance-abs-threshold 64 and --balance-rel-threshold 1.5 (shortest
        #     queue once max - min load > 64 and max > 1.5 x min), --eviction-interval-secs
        #     120 (LRU eviction of the trees), --max-tree-size 33554432 (2**25 per worker).
        #   retries: --retry-max-retries 5, backoff 50 ms x 1.5 up to 30 s, jitter 0.2.
        #   circuit breaker: opens after 10 failures in 120 s, half-open after 60 s.
        #   health: GET /health every 60 s, 5 s timeout, unhealthy after 3 misses.
        #   limits: --max-concurrent-requests 32768, --queue-size 100, --queue-timeout-secs 60,
        #     --request-timeout-secs 1800, --max-payload-size 512 MiB.
        #   --log-level info (startup lines only; debug logs each routing decision).
    ]


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """(status, body) of GET `url`; (0, what went wrong) when there is no answer."""
    try:
        async with session.get(url) as response:
            return response.status, (await response.text())[:200]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


async def _ready_once(
    session: aiohttp.ClientSession, base: str, workers: list[str], seen: dict[str, str]
) -> bool:
    """One round of checks; what each check saw goes into `seen`."""
    seen.clear()
    # The router counts itself ready when one worker answers and marks the others healthy
    # unchecked, so every worker's own /health comes first.
    for worker in workers:
        status, body = await _get(session, f"{worker}/health")
        if status != 200:
            seen[f"worker {worker}/health"] = f"{status or 'no answer'} {body}".strip()
    status, body = await _get(session, f"{base}/readiness")
    if status != 200:
        why = "" if status else " (it listens once a worker answers /health)"
        seen["router /readiness"] = f"{status or 'no answer'} {body}{why}".strip()
    if seen:
        return False
    try:
        state = json.loads(body)
    except ValueError:
        state = {}
    if state.get("healthy_workers") != len(workers) or state.get("total_workers") != len(workers):
        seen["router /readiness"] = f"{body} (want {len(workers)} of {len(workers)})"
        return False
    status, body = await _get(session, f"{base}/list_workers")
    try:
        listed = set(json.loads(body).get("urls", [])) if status == 200 else set()
    except (ValueError, AttributeError):
        listed = set()
    if listed != set(workers):
        seen["router /list_workers"] = f"{status or 'no answer'} {body} (want {sorted(workers)})"
        return False
    # Proxied to a worker, untouched by the policy and its tree: the router forwards.
    status, body = await _get(session, f"{base}/v1/models")
    if status != 200:
        seen["router /v1/models"] = f"{status or 'no answer'} {body}".strip()
        return False
    return True


async def wait_ready(port: int, workers: list[str], timeout: float) -> None:
    """Return once the router on HOST:`port` serves and forwards, with every worker healthy.

    Raises TimeoutError after `timeout` seconds, saying what the last check saw.
    """
    base = f"http://{HOST}:{port}"
    wanted = [worker.rstrip("/") for worker in workers]  # the router drops a trailing "/"
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while not await _ready_once(session, base, wanted, seen):
            if time.monotonic() >= deadline:
                saw = "; ".join(f"{check}: {what}" for check, what in seen.items())
                raise TimeoutError(f"vllm-router on {base} not ready after {timeout:g} s: {saw}")
            await asyncio.sleep(0.1)


def version(binary: Path) -> str:
    """vllm-router's version (`0.1.17`), from the package metadata of the venv holding `binary`."""
    code = "import importlib.metadata as m; print(m.version('vllm-router'))"
    python = binary.parent / "python"
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()
