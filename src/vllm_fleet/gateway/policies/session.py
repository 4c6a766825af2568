"""Pure: `routing: session`, the same replica for every request of a session, within the
load bound (load.py).

A request's session is the value of `gateway.session_header` (default `x-session-id`),
else its body's `user` (gateway/prompt.py); one with neither goes to the least loaded
replica. The replica is chosen by rendezvous hashing (highest random weight): each
replica's weight for the session is a hash of (session, replica name), and the highest
weight that is within the load bound wins. A replica that leaves moves only its own
sessions, and one that joins takes only those it now outweighs; nothing is remembered.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from typing import Any

from vllm_fleet.gateway.body import Body
from vllm_fleet.gateway.policies.base import Hint
from vllm_fleet.gateway.policies.load import eligible, least_loaded, within_bound
from vllm_fleet.gateway.prompt import session_key
from vllm_fleet.registry import Upstream


class SessionPolicy:
    name = "session"

    def __init__(self, header: str) -> None:
        self.header = header.lower().encode("latin-1")
        self.kept = 0  # requests sent to their session's first choice
        self.spills = 0  # ... to another, the first being over the bound
        self.unkeyed = 0  # requests with no session

    def hint(self, parsed: Body | None, lines: Sequence[bytes]) -> Hint:
        return session_key(lines, self.header, parsed.obj if parsed is not None else None)

    def pick(
        self, candidates: Sequence[Upstream], tried: Collection[Upstream], hint: Hint, turn: int
    ) -> Upstream | None:
        ready = eligible(candidates, tried)
        if not ready:
            return None
        if not isinstance(hint, str):
            self.unkeyed += 1
            return least_loaded(ready, turn)
        ranked = ranking(hint, ready)
        for up in ranked:
            if len(ready) == 1 or within_bound(up, ready):
                if up is ranked[0]:
                    self.kept += 1
                else:
                    self.spills += 1
                return up
        self.spills += 1
        return least_loaded(ready, turn)

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "kept": self.kept,
            "spills": self.spills,
            "unkeyed": self.unkeyed,
        }


def ranking(session: str, replicas: Sequence[Upstream]) -> list[Upstream]:
    """`replicas` by their rendezvous weight for `session`, highest first."""
    key = zlib.crc32(session.encode("utf-8", "surrogatepass")) << 32
    return sorted(replicas, key=lambda u: weight(key | zlib.crc32(u.name.encode())), reverse=True)


_MASK = (1 << 64) - 1


def weight(value: int) -> int:
    """splitmix64's finaliser: 64 well-mixed bits of (session, replica), the same in every
    gateway process (CRC-32 alone is linear: its order would repeat across sessions)."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
    return value ^ (value >> 31)
