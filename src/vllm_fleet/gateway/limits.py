"""Limits per key (and per key x deployment): requests and tokens per minute, requests at once.

Each limit is a token bucket holding a minute's worth (`rpm` requests, `tpm` tokens) that
refills continuously, as OpenAI's limits do: a burst up to the limit, then the limit's
rate. Tokens are streaming-correct: admission reserves the request's estimate (its
`max_tokens` or the default, plus its prompt's size) and refuses a request whose estimate
is over what is left; the end of the answer gives the reservation back and charges the
engine's real `usage`. A request is never charged only after it ended.

Pure apart from the clock, which callers pass in (`now`, time.monotonic()). Counters live
in a `Limiter` that a reload keeps (by key name); changed limits apply to them at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_fleet.config.models import KeyLimits
from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.keys import Client

MINUTE = 60.0


class Bucket:
    """`capacity` units that refill at capacity per minute."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / MINUTE
        self.level = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            level = self.level + (now - self.stamp) * self.rate
            self.level = level if level < self.capacity else self.capacity
            self.stamp = now

    def resize(self, capacity: int) -> None:
        """A reload's new limit: the level keeps what was used."""
        used = self.capacity - self.level
        self.capacity = float(capacity)
        self.rate = capacity / MINUTE
        self.level = self.capacity - used

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is there (refilled first); inf if it never fits."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


class Quota:
    """The live counters of one key, or of one key on one deployment."""

    __slots__ = ("in_flight", "limits", "requests", "tokens")

    def __init__(self, limits: KeyLimits, now: float) -> None:
        self.limits = limits
        self.requests = Bucket(limits.rpm, now) if limits.rpm else None
        self.tokens = Bucket(limits.tpm, now) if limits.tpm else None
        self.in_flight = 0

    def update(self, limits: KeyLimits, now: float) -> None:
        self.limits = limits
        self.requests = _resized(self.requests, limits.rpm, now)
        self.tokens = _resized(self.tokens, limits.tpm, now)


def _resized(bucket: Bucket | None, capacity: int | None, now: float) -> Bucket | None:
    if capacity is None:
        return None
    if bucket is None:
        return Bucket(capacity, now)
    bucket.refill(now)
    if bucket.capacity != capacity:
        bucket.resize(capacity)
    return bucket


@dataclass(slots=True)
class Ticket:
    """An admitted request's hold on its quotas, given back once by `settle`."""

    quotas: tuple[Quota, ...]
    reserved: int
    settled: bool = False

    def settle(self, used: int, now: float) -> None:
        """The answer ended: free its place, give back the reservation, charge `used`
        tokens (0 when the engine gave no usage, as for a failed request)."""
        if self.settled:
            return
        self.settled = True
        for quota in self.quotas:
            quota.in_flight -= 1
            if quota.tokens is not None:
                quota.tokens.refill(now)
                quota.tokens.level += self.reserved - used  # may go below 0: the key waits

    def headers(self, now: float) -> bytes:
        """OpenAI's x-ratelimit-* response headers, for the tightest quota of each kind."""
        return rate_headers(self.quotas, now)


class Limiter:
    def __init__(self) -> None:
        self.quotas: dict[tuple[str, str | None], Quota] = {}

    def admit(self, client: Client, deployment: str, estimate: int, now: float) -> Ticket | Reply:
        """Take one request and reserve `estimate` tokens on every quota that applies to
        `client` on `deployment`, or the 429 to answer (nothing taken)."""
        quotas = self._quotas_of(client, deployment, now)
        refusal: tuple[float, str, str] | None = None  # (wait, what, kind)
        for quota, scope in quotas:
            limits = quota.limits
            if limits.max_concurrent is not None and quota.in_flight >= limits.max_concurrent:
                refusal = _worse(
                    refusal, 1.0, f"{limits.max_concurrent} requests at once{scope}", "requests"
                )
            if quota.requests is not None:
                quota.requests.refill(now)
                wait = quota.requests.wait(1.0)
                if wait > 0:
                    what = f"{limits.rpm} requests per minute{scope}"
                    refusal = _worse(refusal, wait, what, "requests")
            if quota.tokens is not None:
                quota.tokens.refill(now)
                wait = quota.tokens.wait(float(estimate))
                if math.isinf(wait):
                    return _too_large(client, estimate, limits.tpm or 0, scope)
                if wait > 0:
                    what = f"{limits.tpm} tokens per minute{scope}"
                    refusal = _worse(refusal, wait, what, "tokens")
        if refusal is not None:
            wait, what, kind = refusal
            retry = max(wait, 0.001)
            return error_reply(
                429,
                f"rate limit of the key `{client.name}` reached: {what}; retry in "
                f"{duration(retry)} (x-ratelimit-* headers say what is left)",
                "rate_limit_exceeded",
                headers=_refusal_headers([q for q, _ in quotas], now, retry),
                kind=kind,
            )
        for quota, _ in quotas:
            quota.in_flight += 1
            if quota.requests is not None:
                quota.requests.level -= 1.0
            if quota.tokens is not None:
                quota.tokens.level -= estimate
        return Ticket(tuple(q for q, _ in quotas), estimate)

    def _quotas_of(self, client: Client, deployment: str, now: float) -> list[tuple[Quota, str]]:
        found = []
        if client.limits.rpm or client.limits.tpm or client.limits.max_concurrent:
            found.append((self._quota((client.name, None), client.limits, now), ""))
        own = client.per_deployment.get(deployment)
        if own is not None:
            found.append((self._quota((client.name, deployment), own, now), f" on `{deployment}`"))
        return found

    def _quota(self, at: tuple[str, str | None], limits: KeyLimits, now: float) -> Quota:
        quota = self.quotas.get(at)
        if quota is None:
            quota = self.quotas[at] = Quota(limits, now)
        elif quota.limits is not limits:
            quota.update(limits, now)  # a reload changed them (or made equal ones anew)
        return quota


def _worse(
    current: tuple[float, str, str] | None, wait: float, what: str, kind: str
) -> tuple[float, str, str]:
    return (wait, what, kind) if current is None or wait > current[0] else current


def _too_large(client: Client, estimate: int, tpm: int, scope: str) -> Reply:
    return error_reply(
        429,
        f"this request may use up to {estimate} tokens (its max_tokens, or "
        f"gateway.default_max_tokens, plus its prompt), over the {tpm} tokens per minute "
        f"of the key `{client.name}`{scope}; ask for fewer tokens (max_tokens)",
        "tokens_over_limit",
        "max_tokens",
        kind="tokens",
    )


_TEMPLATES = {
    kind: b"x-ratelimit-limit-%s: %%d\r\nx-ratelimit-remaining-%s: %%d\r\n"
    b"x-ratelimit-reset-%s: %%s\r\n" % (kind, kind, kind)
    for kind in (b"requests", b"tokens")
}


def rate_headers(quotas: list[Quota] | tuple[Quota, ...], now: float) -> bytes:
    """The x-ratelimit-* lines for the tightest request and token buckets of `quotas`."""
    requests: Bucket | None = None
    tokens: Bucket | None = None
    for quota in quotas:
        bucket = quota.requests
        if bucket is not None:
            bucket.refill(now)
            if requests is None or bucket.level < requests.level:
                requests = bucket
        bucket = quota.tokens
        if bucket is not None:
            bucket.refill(now)
            if tokens is None or bucket.level < tokens.level:
                tokens = bucket
    out = b""
    for bucket, template in ((requests, _TEMPLATES[b"requests"]), (tokens, _TEMPLATES[b"tokens"])):
        if bucket is not None:
            level = int(bucket.level)
            out += template % (bucket.capacity, level if level > 0 else 0, _reset(bucket))
    return out


def _reset(bucket: Bucket) -> bytes:
    return duration((bucket.capacity - bucket.level) / bucket.rate).encode()


def _refusal_headers(quotas: list[Quota], now: float, retry: float) -> dict[str, str]:
    headers = {
        "Retry-After": str(max(1, math.ceil(retry))),
        "retry-after-ms": str(math.ceil(retry * 1000)),
    }
    for line in rate_headers(quotas, now).decode().split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            headers[name] = value
    return headers


def duration(seconds: float) -> str:
    """A wait as OpenAI's headers write it: `20ms`, `1.5s`, `6m0s` (at least `1ms`)."""
    if seconds < 1.0:
        ms = math.ceil(seconds * 1000)
        return f"{ms if ms > 1 else 1}ms"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
