"""`fleet reload` and `fleet diff`: ask a running fleet to reload (or only to plan) over
its `POST /fleet/reload`, print the plan, and follow the reload in `/fleet/status`."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from vllm_fleet.status import StatusError, fetch_status


def post_reload(
    url: str, api_key: str | None, file: str | None, dry_run: bool, timeout: float = 120.0
) -> tuple[int, dict[str, Any]]:
    """POST {url}/fleet/reload; the status and the JSON answer (errors included)."""
    target = url.rstrip("/") + "/fleet/reload"
    body: dict[str, Any] = {"dry_run": dry_run}
    if file is not None:
        body["file"] = file
    request = urllib.request.Request(
        target,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(
            f"no gateway at {url} ({reason}); is `fleet up` running there? Pass the fleet "
            "file or --url (a changed gateway.port needs a restart, not a reload)"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise StatusError(f"{target} answered {status} without JSON") from None
    if not isinstance(data, dict):
        raise StatusError(f"{target} answered {status} with JSON that is not an object")
    if status == 404 and "plan" not in data:
        raise StatusError(f"{target} answered 404; is this a vllm-fleet gateway that reloads?")
    return status, data


def plan_lines(data: dict[str, Any]) -> list[str]:
    plan = data.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("lines"), list):
        return [str(line) for line in plan["lines"]]
    return []


def follow(
    url: str, api_key: str | None, generation: int, timeout: float, every: float = 0.5
) -> dict[str, Any]:
    """Poll /fleet/status until the reload of `generation` is done; its record (or the
    last one seen, with result `applying`, when `timeout` passes first)."""
    deadline = time.monotonic() + timeout
    record: dict[str, Any] = {}
    while True:
        fleet = fetch_status(url, api_key).get("fleet") or {}
        seen = fleet.get("reload") or {}
        if isinstance(seen, dict) and seen.get("generation") == generation:
            record = seen
            if seen.get("result") != "applying":
                return record
        if time.monotonic() >= deadline:
            return record or {"result": "applying", "generation": generation}
        time.sleep(every)
