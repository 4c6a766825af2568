"""Pure: what the gateway measured of each deployment's answers in the last minutes, for
the status page (`GET /fleet/overview`): requests per second, errors, time to first token
p50/p95 and tokens per second over the last minute, and a series of the last five
minutes for its charts.

Answers are counted in buckets of `STEP_S` seconds (unix time); a bucket keeps at most
`SAMPLES` times to first token (past that, new ones replace old ones in turn), so memory
is bounded whatever the traffic (and by the deployments seen: one removed by a reload
keeps its last buckets, a few kB, until the gateway stops). Time to first token is timed
for streamed answers only: from the request's arrival to its stream's first event, which
vLLM sends once the first token is computed. Errors are answers of 500 and over (the
gateway's own 502/503 included); 4xx are the client's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

STEP_S = 5  # seconds per bucket
KEEP_S = 300  # the series' span
WINDOW_S = 60  # the span of the figures
SAMPLES = 256  # times to first token kept per bucket


@dataclass(slots=True)
class _Bucket:
    requests: int = 0
    errors: int = 0
    tokens: int = 0  # completion tokens the engines reported
    ttfts: list[float] = field(default_factory=list)  # seconds
    seen: int = 0  # times to first token offered (ttfts keeps the last SAMPLES)

    def add_ttft(self, seconds: float) -> None:
        if len(self.ttfts) < SAMPLES:
            self.ttfts.append(seconds)
        else:
            self.ttfts[self.seen % SAMPLES] = seconds
        self.seen += 1


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (`share` 0 to 1) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(share * len(ordered))))
    return ordered[rank - 1]


class Recent:
    """The buckets of every deployment seen."""

    def __init__(self) -> None:
        self._buckets: dict[str, dict[int, _Bucket]] = {}

    def add(
        self,
        deployment: str,
        status: int,
        ttft: float | None,
        completion_tokens: int,
        now: float,
    ) -> None:
        """One answer of `deployment`, ended at `now` (unix time)."""
        buckets = self._buckets.setdefault(deployment, {})
        slot = int(now // STEP_S)
        bucket = buckets.get(slot)
        if bucket is None:
            bucket = buckets[slot] = _Bucket()
            oldest = slot - KEEP_S // STEP_S
            for old in [s for s in buckets if s <= oldest]:
                del buckets[old]
        bucket.requests += 1
        if status >= 500:
            bucket.errors += 1
        bucket.tokens += completion_tokens
        if ttft is not None:
            bucket.add_ttft(ttft)

    def figures(self, deployment: str, now: float) -> dict[str, Any]:
        """The last WINDOW_S seconds: requests, req/s, errors, TTFT p50/p95 (ms), tokens/s."""
        buckets = self._buckets.get(deployment, {})
        first = int((now - WINDOW_S) // STEP_S) + 1
        last = int(now // STEP_S)
        span = max(now - first * STEP_S, 1.0)
        requests = errors = tokens = 0
        ttfts: list[float] = []
        for slot in range(first, last + 1):
            bucket = buckets.get(slot)
            if bucket is None:
                continue
            requests += bucket.requests
            errors += bucket.errors
            tokens += bucket.tokens
            ttfts.extend(bucket.ttfts)
        return {
            "window_s": WINDOW_S,
            "requests": requests,
            "rps": round(requests / span, 3),
            "errors": errors,
            "ttft_p50_ms": _ms(percentile(ttfts, 0.5)),
            "ttft_p95_ms": _ms(percentile(ttfts, 0.95)),
            "tokens_per_s": round(tokens / span, 2),
        }

    def series(self, deployment: str, now: float) -> dict[str, Any]:
        """The last KEEP_S seconds, one point per bucket, oldest first: its start (unix
        time), req/s and TTFT p50 in ms (None where nothing was answered)."""
        buckets = self._buckets.get(deployment, {})
        last = int(now // STEP_S)
        slots = range(last - KEEP_S // STEP_S + 1, last + 1)
        t, rps, ttft = [], [], []
        for slot in slots:
            bucket = buckets.get(slot)
            # The current bucket has run only since its start.
            span = STEP_S if slot < last else max(now - slot * STEP_S, 1.0)
            t.append(slot * STEP_S)
            rps.append(round(bucket.requests / span, 3) if bucket is not None else 0.0)
            ttft.append(_ms(percentile(bucket.ttfts, 0.5)) if bucket is not None else None)
        return {"step_s": STEP_S, "t": t, "rps": rps, "ttft_p50_ms": ttft}


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1e3, 1) if seconds is not None else None
