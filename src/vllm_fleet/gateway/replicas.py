"""Pure: which replica of a deployment takes a request (or its next try).

A replica may take it when it is ready, in the rotation (not ejected: the gateway takes
out a replica whose connection failed before any answer, until a health check passes;
registry.py) and not yet tried by this request: a request that fails before its first
byte goes on to another replica, each at most once. Of those, the one with the fewest
outstanding requests; ties go to the first from a rotating start, so that replicas with
equal load take turns. No I/O: the relay calls it and applies the answer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from vllm_fleet.registry import State, Upstream


def pick(candidates: Sequence[Upstream], tried: Collection[Upstream], turn: int) -> Upstream | None:
    """The replica for the next try of a request, or None when none may take it.

    `tried`: the replicas this request was sent to already; `turn`: a number that grows
    by one per call (where ties start)."""
    count = len(candidates)
    if count == 1:
        only = candidates[0]
        ready = only.state is State.READY and only.ejected is None
        return only if ready and only not in tried else None
    best: Upstream | None = None
    start = turn % count if count else 0
    for up in [*candidates[start:], *candidates[:start]]:
        if up.state is not State.READY or up.ejected is not None or up in tried:
            continue
        if best is None or up.outstanding < best.outstanding:
            best = up
    return best
