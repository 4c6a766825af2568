"""vLLM's sleep mode, driven by the fleet (never by clients: the gateway refuses these
routes). Needs `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` (the plan adds both
for `sleep: 1|2`); see shared/notes/vllm-facts.md.

- sleep: `POST /sleep?level=N` (requests still in flight are aborted: the fleet has
  drained the engine first), then `GET /is_sleeping` must say true.
- wake, level 1: `POST /wake_up` (the weights come back from host memory).
- wake, level 2: the weights were dropped: `POST /wake_up?tags=weights`, reload them
  with `POST /collective_rpc {"method": "reload_weights"}`, then
  `POST /wake_up?tags=kv_cache`.
Each returns None when it worked, else why not, in words.
"""

from __future__ import annotations

import json

import aiohttp

from vllm_fleet.engines.process import EngineProcess

# Sleeping copies the weights out (level 1) and waking copies them back: seconds for a
# small model, up to a minute for a large one on a slow bus.
CALL_TIMEOUT = 120.0


async def _call(engine: EngineProcess, method: str, path: str, body: object = None) -> str | None:
    session, url = engine.client(path)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else None
    try:
        async with session.request(
            method,
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
            allow_redirects=False,
        ) as resp:
            text = (await resp.read()).decode("utf-8", errors="replace")
            if resp.status != 200:
                return f"{method} {path} answered {resp.status}: {text[:300]}"
            return None
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{method} {path}: {exc or f'no answer within {CALL_TIMEOUT:g} s'}"


async def is_sleeping(engine: EngineProcess) -> bool | str:
    """The engine's own word on whether it sleeps, or why it gave none."""
    session, url = engine.client("/is_sleeping")
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=10.0), allow_redirects=False
        ) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return f"GET /is_sleeping answered {resp.status}"
            found = json.loads(raw).get("is_sleeping")
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
        return f"GET /is_sleeping: {exc or 'no answer'}"
    return found if isinstance(found, bool) else "GET /is_sleeping gave no `is_sleeping`"


async def _steps(
    engine: EngineProcess, steps: list[tuple[str, object]], asleep: bool, said: str
) -> str | None:
    """POST each (path, body) in turn, then check that `is_sleeping` is `asleep`."""
    for path, body in steps:
        problem = await _call(engine, "POST", path, body)
        if problem is not None:
            return problem
    found = await is_sleeping(engine)
    if found is asleep:
        return None
    return found if isinstance(found, str) else said


async def sleep(engine: EngineProcess, level: int) -> str | None:
    steps: list[tuple[str, object]] = [(f"/sleep?level={level}", None)]
    return await _steps(engine, steps, True, "it answered /sleep but is not sleeping")


async def wake(engine: EngineProcess, level: int) -> str | None:
    if level >= 2:
        steps: list[tuple[str, object]] = [
            ("/wake_up?tags=weights", None),
            ("/collective_rpc", {"method": "reload_weights"}),
            ("/wake_up?tags=kv_cache", None),
        ]
    else:
        steps = [("/wake_up", None)]
    return await _steps(engine, steps, False, "it answered /wake_up but still sleeps")
