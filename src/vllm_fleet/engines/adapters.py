"""LoRA adapters on a base's engines, loaded and unloaded at run time through vLLM's
`POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `/v1/unload_lora_adapter
{"lora_name"}` (the plan gives every base VLLM_ALLOW_RUNTIME_LORA_UPDATING=1; lora.py).

- A new engine process holds none: once its /health passes and before it counts as
  ready, it gets every adapter its base has in the fleet file (`Adapters.on_healthy`,
  the engine's `before_ready`), so a restart gets them back.
- A reload `sync`s each ready engine of a base whose adapters changed: an adapter that
  is gone (or whose directory changed) is drained (the gateway's requests in flight for
  it on that engine, up to `drain`) and unloaded; one that is missing is loaded.
- What is loaded is kept on the engine's `Upstream.adapters` (the gateway routes an
  adapter only to engines that hold it); a failed load in `Upstream.adapter_errors`,
  with vLLM's message, and is tried again by the next sync.

One sync at a time per engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp

from vllm_fleet.config import FleetConfig
from vllm_fleet.config.flags import flag_value
from vllm_fleet.engines.process import EngineProcess
from vllm_fleet.lora import wanted_adapters
from vllm_fleet.registry import Upstream

log = logging.getLogger(__name__)

# Loading reads the adapter's weights from disk (or fetches a Hugging Face id).
CALL_TIMEOUT = 120.0
# A sync that finds the fleet file changed meanwhile goes again, at most this often.
MAX_ROUNDS = 3


def _message(status: int, text: str) -> str:
    """vLLM's own words from an error answer (its JSON `error.message`, or the text)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        found = error.get("message") if isinstance(error, dict) else error
        if isinstance(found, str) and found:
            return f"{found} (HTTP {status})"
    return f"{text.strip()[:300] or 'no message'} (HTTP {status})"


async def _post(engine: EngineProcess, path: str, body: dict[str, str]) -> str | None:
    """POST a JSON body to the engine: None on 200, else vLLM's reason."""
    session, url = engine.client(path)
    headers = {"Content-Type": "application/json"}
    key = flag_value(list(engine.spec.argv), "--api-key")
    if key:
        headers["Authorization"] = f"Bearer {key}"  # vLLM's key guards /v1 routes
    try:
        async with session.post(
            url,
            data=json.dumps(body).encode(),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            text = (await resp.read()).decode("utf-8", errors="replace")
            return None if resp.status == 200 else _message(resp.status, text)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{path}: {exc or f'no answer within {CALL_TIMEOUT:g} s'}"


async def load(engine: EngineProcess, name: str, path: str) -> str | None:
    return await _post(engine, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


async def unload(engine: EngineProcess, name: str) -> str | None:
    return await _post(engine, "/v1/unload_lora_adapter", {"lora_name": name})


async def _drained(upstream: Upstream, name: str, drain: float) -> None:
    """Until the gateway's requests for adapter `name` on this engine are done (a plain
    count the relay keeps, polled like `Supervisor.retire` polls `outstanding`)."""
    deadline = time.monotonic() + drain
    while upstream.adapter_inflight.get(name, 0) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


class Adapters:
    """The adapters of every engine of the fleet (the supervisor holds one)."""

    def __init__(self, config: Callable[[], FleetConfig]) -> None:
        self._config = config  # the fleet file in force (a reload swaps it)
        self._locks: dict[Upstream, asyncio.Lock] = {}

    def wanted(self, upstream: Upstream) -> dict[str, str]:
        return wanted_adapters(self._config(), upstream.deployment)

    async def on_healthy(self, engine: EngineProcess) -> None:
        """A new process passed its first health check: load its base's adapters."""
        upstream = engine.upstream
        upstream.adapters.clear()  # a new process holds none
        upstream.adapter_errors.clear()
        upstream.adapter_inflight.clear()
        if self.wanted(upstream):
            upstream.message = "loading its LoRA adapters"
            await self.sync(engine, 0.0)

    async def sync(self, engine: EngineProcess, drain: float) -> list[str]:
        """Make what `engine` holds what its base's adapters are now (module docstring);
        the loads and unloads that failed, in words."""
        upstream = engine.upstream
        lock = self._locks.setdefault(upstream, asyncio.Lock())
        problems: list[str] = []
        async with lock:
            for _ in range(MAX_ROUNDS):
                wanted = self.wanted(upstream)
                problems = await self._once(engine, wanted, drain)
                if self.wanted(upstream) == wanted:
                    break
        return problems

    async def _once(
        self, engine: EngineProcess, wanted: Mapping[str, str], drain: float
    ) -> list[str]:
        upstream, name = engine.upstream, engine.spec.name
        problems: list[str] = []
        for adapter in [a for a, path in upstream.adapters.items() if wanted.get(a) != path]:
            del upstream.adapters[adapter]  # out of routing on this engine from now on
            await _drained(upstream, adapter, drain)
            problem = await unload(engine, adapter)
            if problem is None:
                log.info("%s: unloaded adapter %s", name, adapter)
                engine.note(f"unloaded LoRA adapter {adapter}")
            else:
                problems.append(f"{adapter} on {name}: unload failed: {problem}")
                log.warning("%s: unloading adapter %s failed: %s", name, adapter, problem)
        for adapter in [a for a in upstream.adapter_errors if a not in wanted]:
            del upstream.adapter_errors[adapter]
        for adapter, path in wanted.items():
            if adapter in upstream.adapters:
                continue
            began = time.monotonic()
            problem = await load(engine, adapter, path)
            if problem is None:
                upstream.adapters[adapter] = path
                upstream.adapter_errors.pop(adapter, None)
                took = time.monotonic() - began
                log.info("%s: loaded adapter %s (%s) in %.1fs", name, adapter, path, took)
                engine.note(f"loaded LoRA adapter {adapter} from {path} in {took:.1f}s")
            else:
                upstream.adapter_errors[adapter] = problem
                problems.append(f"{adapter} on {name}: {problem}")
                log.error("%s: loading adapter %s from %s failed: %s", name, adapter, path, problem)
                engine.note(f"loading LoRA adapter {adapter} from {path} failed: {problem}")
        return problems

    def forget(self, upstream: Upstream) -> None:
        self._locks.pop(upstream, None)
