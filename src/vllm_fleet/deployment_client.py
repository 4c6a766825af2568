"""`fleet load` and `fleet unload`: ask a running fleet to load or unload an on-demand
deployment over `POST /fleet/deployments/{id}/load|unload`, which answer once done."""

from __future__ import annotations

from urllib.parse import quote

from vllm_fleet.status import StatusError, Trust, ask_gateway


def ask(
    url: str, api_key: str | None, trust: Trust, deployment: str, action: str, timeout: float
) -> tuple[bool, str]:
    """(whether it worked, what to print): the deployment's state and how long it took,
    or the gateway's error message."""
    path = f"/fleet/deployments/{quote(deployment, safe='')}/{action}"
    try:
        status, data = ask_gateway(url, path, api_key, timeout, {}, trust=trust)
    except StatusError as exc:
        return False, str(exc)
    if status >= 400:
        error = data.get("error")
        return False, str(error.get("message") if isinstance(error, dict) else data)
    return True, f"{deployment}: {data.get('state')} (took {data.get('took_s')}s)"
