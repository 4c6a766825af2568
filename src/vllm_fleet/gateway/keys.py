"""Who is asking: the fleet file's keys, looked up by the SHA-256 of what a client sends.

Pure: `KeyTable(config)` maps each key's digest to its `Client` (name, deployments,
limits, admin, expiry); `identify` takes the request's `Authorization` / `api-key`
values and returns the client or the 401 to answer. `gateway.api_keys` entries are
clients too: every deployment, no limits, admin, named by their digest's first digits.
A lookup hashes what was sent and finds the digest in a dict: nothing is compared byte
by byte against a secret, so there is no timing to measure.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import time
from dataclasses import dataclass, field

from vllm_fleet.config import FleetConfig
from vllm_fleet.config.models import KeyLimits, key_digest
from vllm_fleet.gateway.errors import Reply, error_reply

_NO_LIMITS = KeyLimits()


@dataclass(frozen=True, slots=True)
class Client:
    """A key as the gateway knows it (never the key itself)."""

    name: str
    deployments: frozenset[str] | None  # None: every deployment
    admin: bool
    limits: KeyLimits = _NO_LIMITS
    per_deployment: dict[str, KeyLimits] = field(default_factory=dict)
    expires_at: float | None = None  # unix time the key stops working (end of its day)
    limited: bool = field(init=False)  # it has a limit somewhere (read per request)

    def __post_init__(self) -> None:
        own = self.limits
        has_own = own.rpm is not None or own.tpm is not None or own.max_concurrent is not None
        object.__setattr__(self, "limited", has_own or bool(self.per_deployment))

    def allows(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments


def _end_of_day(day: datetime.date) -> float:
    """Unix time of the midnight (UTC) that ends `day`."""
    return float(calendar.timegm(day.timetuple())) + 86400.0


class KeyTable:
    def __init__(self, config: FleetConfig) -> None:
        gateway = config.gateway
        self.by_digest: dict[str, Client] = {}
        for plain in gateway.api_keys:
            digest = key_digest(plain)
            self.by_digest[digest] = Client(f"api-key-{digest[:8]}", None, True)
        for key in gateway.keys:
            deployments = None if key.deployments == "*" else frozenset(key.deployments)
            expires = _end_of_day(key.expires) if key.expires is not None else None
            self.by_digest[key.digest] = Client(
                key.name, deployments, key.admin, key.limits_own(), dict(key.limits), expires
            )
        self.enabled = bool(self.by_digest)
        self.names = sorted(c.name for c in self.by_digest.values())

    def identify(self, api_key: str | None, authorization: str | None) -> Client | Reply:
        """The client a request's key names, or the 401 to answer."""
        presented = api_key or ""
        auth = authorization or ""
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        client = None
        if presented:
            # Header values are read as latin-1: encoded back, they are the bytes sent
            # (a key's UTF-8, as `key_digest` hashes it).
            digest = hashlib.sha256(presented.encode("latin-1", "replace")).hexdigest()
            client = self.by_digest.get(digest)
        if client is None:
            return error_reply(
                401,
                "missing or wrong API key; send `Authorization: Bearer <key>` (or Azure's "
                "`api-key: <key>`) with a key of this fleet (gateway.keys / gateway.api_keys)",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if client.expires_at is not None and time.time() >= client.expires_at:
            day = time.strftime("%Y-%m-%d", time.gmtime(client.expires_at - 86400))
            return error_reply(
                401,
                f"the key `{client.name}` expired after {day}; ask the fleet's owner for a "
                "new one (`fleet keys new`)",
                "expired_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return client


def not_allowed(client: Client, deployment: str) -> Reply:
    """403 for a key that may not use `deployment`: it names the key's own deployments,
    never the others'."""
    mine = ", ".join(sorted(client.deployments or ())) or "none"
    return error_reply(
        403,
        f"the key `{client.name}` may not use deployment `{deployment}`; it may use: {mine}",
        "deployment_not_allowed",
        "model",
    )


def admin_only(client: Client, what: str) -> Reply:
    return error_reply(
        403,
        f"{what} needs a key with `admin: true` in gateway.keys; the key `{client.name}` "
        "is not one",
        "admin_required",
    )
