"""The interface every routing policy keeps (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from vllm_fleet.gateway.body import Body
from vllm_fleet.registry import Upstream

Hint = tuple[int, ...] | str | None


class Policy(Protocol):
    name: str

    def hint(self, parsed: Body | None, lines: Sequence[bytes]) -> Hint:
        """What the policy reads of a request (None: nothing)."""
        ...

    def pick(
        self, candidates: Sequence[Upstream], tried: Collection[Upstream], hint: Hint, turn: int
    ) -> Upstream | None:
        """The replica for the next try of a request, or None when none may take it."""
        ...

    def stats(self) -> dict[str, Any]:
        """Its counters, for the status snapshot and /metrics."""
        ...
