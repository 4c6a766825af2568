"""Pure: `routing: prefix`, the replica most likely to hold a request's prompt prefix in
vLLM's prefix cache, within the load bound (load.py).

The policy remembers, for each prompt block hash it has seen (gateway/prompt.py: the
hash of a block stands for the whole prefix up to it), the replica that was last sent
that prefix: a table of at most CAPACITY blocks, the least recently used forgotten
first (an engine's cache forgets too). A request goes to the replica of its longest
remembered prefix that may take it (ready, in the rotation, not tried) while that
replica is within the load bound (a hit); else, or when no prefix is remembered (a
miss), or over the bound (a spill), to the least loaded replica. Either way, every
block of its prompt is then remembered for the replica chosen: the next turn of a
conversation follows it.

A replica that leaves (removed, ejected, not ready) loses only its own prefixes: the
rest of the table still points where it did; its prefixes go, as they are asked for
again, to the replicas that take them. No tokenizer, no I/O: a request costs one pass
over its first 8 KiB and a dict lookup and update per block (bench/policy_cost.py).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from vllm_fleet.gateway.body import Body
from vllm_fleet.gateway.policies.base import Hint
from vllm_fleet.gateway.policies.load import eligible, least_loaded, within_bound
from vllm_fleet.gateway.prompt import prompt_blocks
from vllm_fleet.registry import Upstream

CAPACITY = 1 << 16  # blocks remembered (of 256 bytes: 16 MiB of prompts), a few MB


class PrefixPolicy:
    name = "prefix"

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._owner: dict[int, str] = {}  # block hash -> replica name; oldest first
        self.hits = 0
        self.misses = 0
        self.spills = 0

    def hint(self, parsed: Body | None, lines: Sequence[bytes]) -> Hint:
        return prompt_blocks(parsed.obj) if parsed is not None else None

    def pick(
        self, candidates: Sequence[Upstream], tried: Collection[Upstream], hint: Hint, turn: int
    ) -> Upstream | None:
        ready = eligible(candidates, tried)
        if not ready:
            return None
        blocks = hint if isinstance(hint, tuple) else ()
        if not blocks:  # no prompt (a GET, an upload) or one shorter than a block
            return ready[0] if len(ready) == 1 else least_loaded(ready, turn)
        preferred = self.holder(blocks, ready)
        if len(ready) == 1:
            chosen = ready[0]
        elif preferred is not None and within_bound(preferred, ready):
            chosen = preferred
        else:
            chosen = least_loaded(ready, turn)
        if preferred is None:
            self.misses += 1
        elif chosen is preferred:
            self.hits += 1
        else:
            self.spills += 1
        self._remember(blocks, chosen.name)
        return chosen

    def holder(self, blocks: Sequence[int], ready: Sequence[Upstream]) -> Upstream | None:
        """The replica of `ready` last sent the longest prefix of `blocks`, if any."""
        owner = self._owner
        for block in reversed(blocks):
            name = owner.get(block)
            if name is not None:
                for up in ready:
                    if up.name == name:
                        return up
        return None

    def _remember(self, blocks: Sequence[int], name: str) -> None:
        owner = self._owner
        for block in blocks:
            owner.pop(block, None)  # to the end: the most recently used
            owner[block] = name
        excess = len(owner) - self.capacity
        if excess > 0:
            for block in list(_first(owner, excess)):
                del owner[block]

    def stats(self) -> dict[str, Any]:
        return {
            "policy": self.name,
            "hits": self.hits,
            "misses": self.misses,
            "spills": self.spills,
            "blocks": len(self._owner),
        }


def _first(table: dict[int, str], count: int) -> list[int]:
    out: list[int] = []
    for block in table:
        if len(out) >= count:
            break
        out.append(block)
    return out
