"""Pure: the replicas that may take a request, how loaded each is, and the load bound the
`prefix` and `session` policies keep to.

A replica's load is its requests in flight through the gateway (`outstanding`) plus the
requests its engine last reported waiting for a batch (`vllm:num_requests_waiting`, read
from its /metrics every `engines.health_interval`; 0 for an engine without vLLM's
metrics): a queue at the engine is load the gateway did not send, or sent and the
engine could not start yet. An engine whose KV cache was last seen FULL
(`vllm:kv_cache_usage_perc`) counts as over the bound while another is not.

The bound (consistent hashing with bounded loads, Mirrokni et al.): a preferred replica
takes the request while its load, with it, stays within BALANCE x the mean load with
it, rounded up, and never below 2 (a replica may take a second request while another
sits idle: the prefix it holds is worth more than an idle batch slot).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from vllm_fleet.registry import State, Upstream

BALANCE = 1.25
FULL = 0.95  # KV-cache use at which a replica is over the bound


def eligible(candidates: Sequence[Upstream], tried: Collection[Upstream]) -> list[Upstream]:
    """Those ready, in the rotation and not yet tried by this request."""
    return [
        u for u in candidates if u.state is State.READY and u.ejected is None and u not in tried
    ]


def load(up: Upstream) -> float:
    return up.outstanding + up.engine_waiting


def least_loaded(ready: Sequence[Upstream], turn: int) -> Upstream:
    """The least loaded of `ready` (not empty), the fuller KV cache losing a tie; ties
    beyond that go to the first from a rotating start (`turn`)."""
    count = len(ready)
    start = turn % count
    best = ready[start]
    best_key = (load(best), best.kv_cache)
    for i in range(1, count):
        up = ready[(start + i) % count]
        key = (load(up), up.kv_cache)
        if key < best_key:
            best, best_key = up, key
    return best


def within_bound(up: Upstream, ready: Sequence[Upstream]) -> bool:
    """Whether `up` may take one more request without breaking the load bound."""
    if up.kv_cache >= FULL and any(u.kv_cache < FULL for u in ready):
        return False
    total = sum(load(u) for u in ready) + 1
    cap = max(math.ceil(BALANCE * total / len(ready)), 2)
    return load(up) + 1 <= cap
