"""Pure: `routing: round_robin`, each replica in turn (as nginx's default), whatever
its load; one that may not take a request is passed over."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from vllm_fleet.gateway.body import Body
from vllm_fleet.gateway.policies.base import Hint
from vllm_fleet.gateway.policies.load import eligible
from vllm_fleet.registry import Upstream


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def hint(self, parsed: Body | None, lines: Sequence[bytes]) -> Hint:
        return None

    def pick(
        self, candidates: Sequence[Upstream], tried: Collection[Upstream], hint: Hint, turn: int
    ) -> Upstream | None:
        ready = eligible(candidates, tried)
        if not ready:
            return None
        chosen = ready[self._next % len(ready)]
        self._next += 1
        return chosen

    def stats(self) -> dict[str, Any]:
        return {"policy": self.name}
