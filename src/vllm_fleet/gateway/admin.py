"""The gateway's admin routes, decided (pure): `POST /fleet/reload`.

Who may reload: with `gateway.api_keys` set, a request with one of them; without keys,
only a client on this machine (loopback), since anyone who can reach the gateway could
otherwise change the fleet. The body is optional: `{"file": PATH, "dry_run": true}`
(or `?dry_run=1`); without `file` the fleet re-reads the file it was started with.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.errors import Reply, error_reply

RELOAD_PATH = "/fleet/reload"


@dataclass(frozen=True)
class ReloadAsk:
    file: str | None
    dry_run: bool


def is_loopback(peer: str) -> bool:
    """Whether a client address is this machine's loopback (an IPv4 client of a
    dual-stack listener shows as `::ffff:127.0.0.1`)."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def reload_request(
    core: Core,
    method: str,
    query: str,
    body: bytes,
    peer: str,
    api_key: str | None,
    authorization: str | None,
) -> ReloadAsk | Reply:
    """What a request to /fleet/reload asks, or the error to answer."""
    if method != "POST":
        return error_reply(
            405,
            f"{RELOAD_PATH} takes POST (`fleet reload`, or SIGHUP to `fleet up`)",
            "method_not_allowed",
            headers={"Allow": "POST"},
        )
    if core.keys:
        denied = core.authorize(api_key, authorization)
        if denied is not None:
            return denied
    elif not is_loopback(peer):
        return error_reply(
            403,
            f"{RELOAD_PATH} is accepted only from this machine while gateway.api_keys is "
            "empty; run `fleet reload` there, or set a key in gateway.api_keys",
            "forbidden",
        )
    dry_run = any(
        part.partition("=")[0] == "dry_run" and part.partition("=")[2] not in ("", "0", "false")
        for part in query.split("&")
    )
    file: str | None = None
    if body.strip():
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return error_reply(
                400,
                'the body of POST /fleet/reload is a JSON object: {"file": "/path/fleet.yaml", '
                '"dry_run": false}, both optional',
                "invalid_json",
            )
        raw_file, raw_dry = data.get("file"), data.get("dry_run", False)
        if raw_file is not None and (not isinstance(raw_file, str) or not raw_file):
            return error_reply(400, "`file` must be a path (a string)", "invalid_request", "file")
        if not isinstance(raw_dry, bool):
            return error_reply(400, "`dry_run` must be true or false", "invalid_request", "dry_run")
        file, dry_run = raw_file, dry_run or raw_dry
    return ReloadAsk(file, dry_run)
