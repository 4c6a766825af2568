"""`fleet reload` and `fleet diff`: ask a running fleet to reload (or only to plan) over
its `POST /fleet/reload`, print the plan, and follow the reload in `/fleet/status`."""

from __future__ import annotations

import time
from typing import Any

from vllm_fleet.status import StatusError, Trust, ask_gateway, fetch_status


def post_reload(
    url: str,
    api_key: str | None,
    file: str | None,
    dry_run: bool,
    timeout: float = 120.0,
    trust: Trust | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST {url}/fleet/reload; the status and the JSON answer (errors included)."""
    body: dict[str, Any] = {"dry_run": dry_run}
    if file is not None:
        body["file"] = file
    status, data = ask_gateway(
        url, "/fleet/reload", api_key, timeout, body,
        unreachable_hint=" (a changed gateway.port needs a restart, not a reload)",
        trust=trust,
    )  # fmt: skip
    if status == 404 and "plan" not in data:
        raise StatusError(f"{url} answered 404 to /fleet/reload; is this a vllm-fleet gateway?")
    return status, data


def plan_lines(data: dict[str, Any]) -> list[str]:
    plan = data.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("lines"), list):
        return [str(line) for line in plan["lines"]]
    return []


def follow(
    url: str,
    api_key: str | None,
    generation: int,
    timeout: float,
    every: float = 0.5,
    trust: Trust | None = None,
) -> dict[str, Any]:
    """Poll /fleet/status until the reload of `generation` is done; its record (or the
    last one seen, with result `applying`, when `timeout` passes first)."""
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    misses = 0
    while True:
        try:
            fleet = fetch_status(url, api_key, trust=trust).get("fleet") or {}
        except StatusError:
            # A gateway slow to answer for a moment (a machine busy loading engines) is
            # asked again; one gone for good ends the wait.
            misses += 1
            if misses >= 10 or time.monotonic() >= deadline:
                raise
            time.sleep(every)
            continue
        misses = 0
        seen = fleet.get("reload") or {}
        if isinstance(seen, dict) and seen.get("generation") == generation:
            record = seen
            if seen.get("result") != "applying":
                return record
        if time.monotonic() >= deadline:
            return record or {"result": "applying", "generation": generation}
        time.sleep(every)
