"""The fake engine's automatic prefix cache, prefill queue and KV-cache gauge, modelled on
vLLM 0.32's (vllm/v1/core/kv_cache_manager.py, block_pool.py). Imports no `fake_vllm`.

Tokens: the fake's tokens of a prompt are its whitespace-separated words, each word's id
`zlib.crc32(word) & 0xFFFFFF` (`token_id`). A chat prompt is rendered as each message's
`"<role>: <content>"` joined by newlines (content a string or a list of parts with `text`);
a completion's is its `prompt` (a string, or a list of them, joined). `/tokenize` answers
these ids. Any JSON is read without failing: what is not text adds no token.

Blocks, as vLLM's: `FAKE_VLLM_BLOCK_TOKENS` tokens each (16). Only full blocks are cached,
each keyed by a hash chained over its parent block's key and its own token ids, so a block
only matches when the whole prefix before it does. `FAKE_VLLM_PREFIX_BLOCKS` (4096) blocks
at most, least recently used evicted first; a request touches its blocks last to first, so
a prefix's head outlives its tail (vLLM frees a request's blocks in reverse order). 0 turns
the cache off (nothing is looked up or counted, as `--no-enable-prefix-caching`).

Per chat or completion request: hit tokens = block size x the leading blocks found cached;
then every full block of the prompt is cached (or touched). `vllm:prefix_cache_queries`
grows by the prompt's tokens, `vllm:prefix_cache_hits` by the hit tokens (vLLM counts both
in tokens). Only prompt tokens are cached, not generated ones.

Prefill (`FAKE_VLLM_PREFILL_US_PER_TOKEN`, microseconds, 0: none): before its first token a
request waits (prompt tokens - hit tokens) x that. Prefills are computed one at a time (one
lock per engine, as one engine core); the lookup happens once the lock is taken, so a
request queued behind the same prompt hits it. While queued or prefilling a request counts
in `vllm:num_requests_waiting`, then as running.

`vllm:kv_cache_usage_perc`: the blocks the requests in flight hold, each
ceil((prompt + generated tokens) / block size), over `FAKE_VLLM_PREFIX_BLOCKS` (4096 when
0), at most 1; 0 when none is in flight. `/fake/stats` adds `"prefix": {"queries", "hits",
"blocks"}` (`blocks`: cached now); `?reset=1` restarts queries and hits there (the /metrics
counters never go back, and the cache stays). `POST /reset_prefix_cache` (a dev route:
only with `VLLM_SERVER_DEV_MODE=1`) and a sleep of level 1 or 2 empty the cache.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

BLOCK_ENV = "FAKE_VLLM_BLOCK_TOKENS"
BLOCKS_ENV = "FAKE_VLLM_PREFIX_BLOCKS"
PREFILL_ENV = "FAKE_VLLM_PREFILL_US_PER_TOKEN"
DEFAULT_BLOCK_TOKENS = 16
DEFAULT_BLOCKS = 4096
_ROOT = 0  # the parent key of a prompt's first block


def token_id(word: str) -> int:
    """The fake's id of one word (a lone surrogate from JSON included)."""
    return zlib.crc32(word.encode("utf-8", "surrogatepass")) & 0xFFFFFF


def _words(value: Any) -> list[str]:
    """The words of any JSON value: strings split on whitespace, numbers as one word, lists
    in order, an object's `content` then `text`; anything else none. No recursion: any
    nesting depth is fine."""
    words: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            words.extend(item.split())
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend((item.get("text", ""), item.get("content", "")))
        elif isinstance(item, int):
            words.append(str(item))
    return words


def chat_text(messages: Any) -> str:
    """The rendered chat prompt: `"<role>: <content>"` per message, joined by newlines."""
    if not isinstance(messages, list):
        return " ".join(_words(messages))
    lines = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            content = " ".join(_words(message.get("content")))
            lines.append(f"{role if isinstance(role, str) else ''}: {content}")
        else:
            lines.append(" ".join(_words(message)))
    return "\n".join(lines)


def prompt_ids(body: Mapping[str, Any], chat: bool) -> list[int]:
    """The token ids of a request's prompt: its `messages` rendered (`chat`), else its
    `prompt`."""
    words = chat_text(body.get("messages")).split() if chat else _words(body.get("prompt"))
    return [token_id(word) for word in words]


class PrefixCache:
    """vLLM's automatic prefix cache, reduced to block keys: chained keys of full blocks,
    at most `capacity` of them, LRU. `queries` and `hits` count tokens and only grow."""

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS, capacity: int = DEFAULT_BLOCKS):
        if block_tokens < 1 or capacity < 0:
            raise ValueError(
                f"need block_tokens >= 1 and capacity >= 0: {block_tokens}, {capacity}"
            )
        self.block_tokens = block_tokens
        self.capacity = capacity
        self.queries = 0
        self.hits = 0
        self._blocks: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self, tokens: list[int]) -> list[int]:
        """The chained key of each full block of `tokens`, in order."""
        keys, parent, size = [], _ROOT, self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash((parent, tuple(tokens[start : start + size])))
            keys.append(parent)
        return keys

    def lookup(self, tokens: list[int]) -> int:
        """The tokens of the leading blocks already cached, counted (queries, hits)."""
        if not self.enabled:
            return 0
        found = 0
        for key in self.keys(tokens):
            if key not in self._blocks:
                break
            found += 1
        hit = found * self.block_tokens
        self.queries += len(tokens)
        self.hits += hit
        return hit

    def insert(self, tokens: list[int]) -> None:
        """Cache (or touch) every full block of `tokens`, last to first, then evict the
        least recently used past capacity."""
        if not self.enabled:
            return
        for key in reversed(self.keys(tokens)):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def admit(self, tokens: list[int]) -> int:
        """A request's prompt: look it up, then cache it; the hit tokens."""
        hit = self.lookup(tokens)
        self.insert(tokens)
        return hit

    def clear(self) -> None:
        self._blocks.clear()


def _env_number(
    environ: Mapping[str, str], name: str, default: float, least: float, whole: bool
) -> float:
    """The number in `environ[name]` (`default` when unset or empty); ValueError naming
    the variable when it is not one, or is below `least`."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(int(raw)) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= least):
        what = "a whole number" if whole else "a number"
        raise ValueError(f"{name} must be {what} >= {least:g}, got {raw!r}")
    return value


class Queue(Protocol):
    """What a prefill counts itself in while it waits: the engine's waiting requests."""

    waiting: int


@dataclass(eq=False)
class InFlight:
    """A request in flight: its prompt's tokens and those generated so far."""

    prompt: int
    generated: int = 0


class Prefix:
    """An engine's prefix cache, its prefill queue and the sequences it holds in flight."""

    def __init__(self, cache: PrefixCache | None = None, us_per_token: float = 0.0) -> None:
        self.cache = cache if cache is not None else PrefixCache()
        self.us_per_token = us_per_token
        self.lock = asyncio.Lock()  # one prefill at a time, as one engine core
        self.running: set[InFlight] = set()
        self.started = time.time()
        self._since = (0, 0)  # (queries, hits) at the last /fake/stats reset

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Prefix:
        """From FAKE_VLLM_BLOCK_TOKENS, FAKE_VLLM_PREFIX_BLOCKS, FAKE_VLLM_PREFILL_US_PER_TOKEN;
        ValueError naming the variable when one is not a number in range."""
        cache = PrefixCache(
            int(_env_number(environ, BLOCK_ENV, DEFAULT_BLOCK_TOKENS, 1, whole=True)),
            int(_env_number(environ, BLOCKS_ENV, DEFAULT_BLOCKS, 0, whole=True)),
        )
        return cls(cache, _env_number(environ, PREFILL_ENV, 0, 0, whole=False))

    async def prefill(self, tokens: list[int], queue: Queue) -> InFlight:
        """Look the prompt up, compute its missed tokens (one prefill at a time, counted in
        `queue.waiting` meanwhile) and cache it; the sequence, held until `release`."""
        if self.us_per_token <= 0:
            self.cache.admit(tokens)
        else:
            queue.waiting += 1
            try:
                async with self.lock:
                    hit = self.cache.lookup(tokens)
                    await asyncio.sleep((len(tokens) - hit) * self.us_per_token / 1e6)
                    self.cache.insert(tokens)
            finally:
                queue.waiting -= 1
        sequence = InFlight(len(tokens))
        self.running.add(sequence)
        return sequence

    def release(self, sequence: InFlight) -> None:
        self.running.discard(sequence)

    def kv_usage(self) -> float:
        """The share of the KV cache the sequences in flight hold, 0 to 1."""
        size = self.cache.block_tokens
        held = sum(-(-(s.prompt + s.generated) // size) for s in self.running)
        return min(1.0, held / (self.cache.capacity or DEFAULT_BLOCKS))

    def clear(self) -> None:
        self.cache.clear()

    def stats(self) -> dict[str, Any]:
        queries, hits = self.cache.queries - self._since[0], self.cache.hits - self._since[1]
        return {"prefix": {"queries": queries, "hits": hits, "blocks": len(self.cache)}}

    def reset_stats(self) -> None:
        self._since = (self.cache.queries, self.cache.hits)


class PrefixStats(Collector):
    """`vllm:prefix_cache_queries`, `vllm:prefix_cache_hits` (counters: `_total` added) and
    `vllm:kv_cache_usage_perc`, with vLLM's help texts and labels."""

    def __init__(self, prefix: Prefix, model_name: str) -> None:
        self.prefix = prefix
        self.model_name = model_name

    def collect(self) -> Any:
        labels, values = ["engine", "model_name"], ["0", self.model_name]
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels
        )
        usage.add_metric(values, self.prefix.kv_usage())
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels=labels,
        )
        cache, started = self.prefix.cache, self.prefix.started
        queries.add_metric(values, float(cache.queries), created=started)
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels=labels,
        )
        hits.add_metric(values, float(cache.hits), created=started)
        yield from (usage, queries, hits)


def install(prefix: Prefix, model_name: str, metrics: CollectorRegistry | None) -> None:
    """The metrics (with stats on). Clearing is fake_sleep's: its dev route
    `POST /reset_prefix_cache` and a sleep of level 1 or 2 call `Prefix.clear`."""
    if metrics is not None:
        metrics.register(PrefixStats(prefix, model_name))
