"""The fake engine's prefix cache behaves like vLLM's automatic one: the cache itself, then
real engine subprocesses over real HTTP (fake_prefix.py's docstring is the contract)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from openai import OpenAI

from tests.conftest import wait_until
from vllm_fleet.engines.vllm_metrics import EngineLoad, parse_load
from vllm_fleet.testing.fake_prefix import (
    BLOCK_ENV,
    BLOCKS_ENV,
    PREFILL_ENV,
    Prefix,
    PrefixCache,
    prompt_ids,
    token_id,
)
from vllm_fleet.testing.harness import FakeEngine, engine_json, engine_request

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _words(tag: str, count: int) -> str:
    """`count` words no other test uses: `tag0 tag1 ...`."""
    return " ".join(f"{tag}{i}" for i in range(count))


# --- the cache, in process ---------------------------------------------------------------


def test_a_block_matches_only_when_the_whole_prefix_before_it_does() -> None:
    cache = PrefixCache(block_tokens=2, capacity=100)
    assert cache.admit([1, 2, 3, 4]) == 0
    assert cache.keys([9, 9, 3, 4])[1] != cache.keys([1, 2, 3, 4])[1]
    assert cache.lookup([9, 9, 3, 4]) == 0  # same second block, other first: a miss
    assert cache.lookup([1, 2, 7, 7]) == 2  # the first block only
    assert cache.lookup([1, 2, 3, 4, 5]) == 4


def test_only_full_blocks_are_cached_and_hit() -> None:
    cache = PrefixCache(block_tokens=4, capacity=100)
    assert cache.admit([1, 2, 3]) == 0
    assert len(cache) == 0  # shorter than a block: nothing to cache
    assert cache.admit([1, 2, 3, 4, 5, 6, 7]) == 0
    assert len(cache) == 1
    assert cache.admit([1, 2, 3, 4, 5, 6, 7]) == 4  # the partial block is computed again


def test_queries_and_hits_count_tokens() -> None:
    cache = PrefixCache(block_tokens=4, capacity=100)
    cache.admit(list(range(10)))
    cache.admit(list(range(10)))
    cache.admit([*range(8), 99, 98, 97, 96, 95])
    assert (cache.queries, cache.hits) == (10 + 10 + 13, 0 + 8 + 8)


def test_lru_evicts_the_least_recently_used_block_at_capacity() -> None:
    cache = PrefixCache(block_tokens=2, capacity=2)
    for block in ([1, 1], [2, 2], [1, 1], [3, 3]):  # [1, 1] touched again before [3, 3]
        cache.admit(block)
    assert len(cache) == 2
    assert [cache.lookup(b) for b in ([1, 1], [2, 2], [3, 3])] == [2, 0, 2]


def test_a_prompts_head_outlives_its_tail_when_evicted() -> None:
    cache = PrefixCache(block_tokens=1, capacity=3)
    cache.admit([1, 2, 3])
    cache.admit([9])  # one over capacity: the tail block [3] goes, not the head [1]
    assert cache.lookup([1, 2, 3]) == 2


def test_capacity_0_turns_the_cache_off() -> None:
    cache = PrefixCache(block_tokens=2, capacity=0)
    assert [cache.admit([1, 2, 3, 4]) for _ in range(2)] == [0, 0]
    assert (len(cache), cache.queries, cache.hits) == (0, 0, 0)


def test_prompt_tokens_are_its_words_chat_rendered_as_role_and_content() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"},
                                         {"type": "image_url", "image_url": {"url": "x y"}}]},
        ]
    }  # fmt: skip
    words = ["system:", "be", "brief", "user:", "hi", "there"]
    assert prompt_ids(chat, chat=True) == [token_id(w) for w in words]
    assert token_id("hi") == token_id("hi") != token_id("there")
    assert all(0 <= token_id(w) < 1 << 24 for w in words)
    completion = {"prompt": ["one two", "three"]}
    assert prompt_ids(completion, chat=False) == [token_id(w) for w in ["one", "two", "three"]]


def _nested(depth: int) -> list[Any]:
    """["deep"] inside `depth` more lists: deeper than Python's recursion limit."""
    value: list[Any] = ["deep"]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": None, "prompt": None},
        {"messages": "just text", "prompt": {"text": 3}},
        {"messages": [None, 7, "x", [], {"role": 5, "content": {"a": 1}}], "prompt": [[1], True]},
        {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}], "prompt": "\ud800"},
        {"messages": [[[[[]]]]] * 3, "prompt": _nested(5000)},
    ],
)
def test_any_json_body_gives_tokens_without_failing(body: dict[str, Any]) -> None:
    for chat in (True, False):
        assert all(isinstance(t, int) for t in prompt_ids(body, chat))


def test_kv_usage_is_the_blocks_in_flight_over_capacity_capped_at_1() -> None:
    class Queue:
        waiting = 0

    async def go() -> list[float]:
        prefix = Prefix(PrefixCache(block_tokens=4, capacity=10))
        seen = [prefix.kv_usage()]
        first = await prefix.prefill(list(range(6)), Queue())  # 2 blocks
        seen.append(prefix.kv_usage())
        first.generated = 3  # 9 tokens: 3 blocks
        seen.append(prefix.kv_usage())
        second = await prefix.prefill(list(range(100)), Queue())
        seen.append(prefix.kv_usage())
        for sequence in (first, second):
            prefix.release(sequence)
        seen.append(prefix.kv_usage())
        return seen

    assert asyncio.run(go()) == [0.0, 0.2, 0.3, 1.0, 0.0]


def test_env_sets_the_cache_and_bad_values_fail_naming_the_variable() -> None:
    prefix = Prefix.from_env({BLOCK_ENV: "8", BLOCKS_ENV: "0", PREFILL_ENV: "2.5"})
    assert (prefix.cache.block_tokens, prefix.cache.capacity, prefix.us_per_token) == (8, 0, 2.5)
    default = Prefix.from_env({})
    assert (default.cache.block_tokens, default.cache.capacity, default.us_per_token) == (
        16,
        4096,
        0.0,
    )
    bad = [(BLOCK_ENV, "0"), (BLOCK_ENV, "x"), (BLOCKS_ENV, "-1"), (BLOCKS_ENV, "1.5"),
           (PREFILL_ENV, "-1"), (PREFILL_ENV, "nan")]  # fmt: skip
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            Prefix.from_env({name: value})


# --- a fake engine -----------------------------------------------------------------------


def _stats(eng: FakeEngine, reset: bool = False) -> dict[str, int]:
    prefix: dict[str, int] = engine_json(
        eng.url, "/fake/stats?reset=1" if reset else "/fake/stats"
    )["prefix"]
    return prefix


def _metrics(eng: FakeEngine) -> str:
    status, body = engine_request(eng.url, "/metrics")
    assert status == 200
    return body.decode()


def _load(eng: FakeEngine) -> EngineLoad:
    load = parse_load(_metrics(eng))
    assert load is not None
    return load


def _queue(eng: FakeEngine) -> tuple[float, float]:
    """(waiting, running), from one scrape."""
    load = _load(eng)
    return load.waiting, load.running


def _chat(eng: FakeEngine, messages: list[dict[str, str]]) -> None:
    client = OpenAI(base_url=f"{eng.url}/v1", api_key="x")
    client.chat.completions.create(model="smol", messages=messages)


@pytest.fixture(scope="module")
def dev_engine() -> Iterator[FakeEngine]:
    """Blocks of 4 tokens, dev routes and sleep mode on."""
    env = {BLOCK_ENV: "4", "VLLM_SERVER_DEV_MODE": "1"}
    args = ("--tokens", "3", "--enable-sleep-mode", "--fake-sleep-delay", "0",
            "--fake-wake-delay", "0")  # fmt: skip
    with FakeEngine(MODEL, ["smol"], *args, env=env) as eng:
        yield eng


def test_a_repeated_chat_hits_every_full_block_and_metrics_count_it() -> None:
    env = {BLOCK_ENV: "4", "VLLM_SERVER_DEV_MODE": "0"}
    with FakeEngine(MODEL, ["smol"], "--tokens", "3", env=env) as eng:
        messages = [{"role": "user", "content": _words("w", 9)}]  # "user:" + 9: 10 tokens
        status, body = engine_request(
            eng.url, "/tokenize", "POST", json.dumps({"messages": messages}).encode()
        )
        assert status == 200
        tokenized = json.loads(body)
        assert tokenized == {"count": 10, "max_model_len": 2048,
                             "tokens": prompt_ids({"messages": messages}, chat=True)}  # fmt: skip
        _chat(eng, messages)
        _chat(eng, messages)
        page = _metrics(eng)
        assert 'vllm:prefix_cache_queries_total{engine="0",model_name="smol"} 20.0' in page
        assert 'vllm:prefix_cache_hits_total{engine="0",model_name="smol"} 8.0' in page
        assert 'vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.0' in page
        assert _stats(eng) == {"queries": 20, "hits": 8, "blocks": 2}
        # Without dev mode the route does not exist, and the cache stays.
        assert engine_request(eng.url, "/reset_prefix_cache", "POST", b"")[0] == 404
        _chat(eng, messages)
        assert _stats(eng) == {"queries": 30, "hits": 16, "blocks": 2}


def test_a_conversations_next_turn_hits_the_previous_prompts_full_blocks(
    dev_engine: FakeEngine,
) -> None:
    first = [
        {"role": "system", "content": _words("sys", 12)},
        {"role": "user", "content": _words("ask", 4)},
    ]  # 13 + 5 = 18 tokens: 4 full blocks
    _stats(dev_engine, reset=True)
    _chat(dev_engine, first)
    following = [*first, {"role": "assistant", "content": "tok0 tok1 tok2"},
                 {"role": "user", "content": _words("more", 6)}]  # fmt: skip
    _chat(dev_engine, following)
    assert _stats(dev_engine)["hits"] == 16
    assert _stats(dev_engine)["queries"] == 18 + 18 + 4 + 7


def test_stats_reset_restarts_the_counters_but_keeps_the_cache(dev_engine: FakeEngine) -> None:
    prompt = {"prompt": _words("keep", 8)}
    engine_request(dev_engine.url, "/v1/completions", "POST", json.dumps(prompt).encode())
    blocks = _stats(dev_engine)["blocks"]
    _stats(dev_engine, reset=True)
    assert _stats(dev_engine) == {"queries": 0, "hits": 0, "blocks": blocks}
    engine_request(dev_engine.url, "/v1/completions", "POST", json.dumps(prompt).encode())
    assert _stats(dev_engine) == {"queries": 8, "hits": 8, "blocks": blocks}


def _completion_hits(eng: FakeEngine, prompt: str) -> int:
    before = _stats(eng)["hits"]
    status, _ = engine_request(
        eng.url, "/v1/completions", "POST", json.dumps({"prompt": prompt}).encode()
    )
    assert status == 200
    return _stats(eng)["hits"] - before


def test_reset_prefix_cache_in_dev_mode_empties_the_cache(dev_engine: FakeEngine) -> None:
    prompt = _words("reset", 8)
    _completion_hits(dev_engine, prompt)
    assert _completion_hits(dev_engine, prompt) == 8
    status, body = engine_request(dev_engine.url, "/reset_prefix_cache", "POST", b"")
    assert (status, body) == (200, b"")
    assert _stats(dev_engine)["blocks"] == 0
    assert _completion_hits(dev_engine, prompt) == 0


@pytest.mark.parametrize(("level", "kept"), [(0, True), (1, False), (2, False)])
def test_a_sleep_of_level_1_or_2_empties_the_cache(
    dev_engine: FakeEngine, level: int, kept: bool
) -> None:
    prompt = _words(f"sleep{level}x", 8)
    _completion_hits(dev_engine, prompt)
    blocks = _stats(dev_engine)["blocks"]
    assert engine_request(dev_engine.url, f"/sleep?level={level}", "POST", b"")[0] == 200
    assert engine_request(dev_engine.url, "/wake_up", "POST", b"")[0] == 200
    assert _stats(dev_engine)["blocks"] == (blocks if kept else 0)
    assert _completion_hits(dev_engine, prompt) == (8 if kept else 0)


@pytest.fixture(scope="module")
def slow_prefill() -> Iterator[FakeEngine]:
    """5 ms per prompt token computed: 400 uncached tokens take 2 s to their first."""
    env = {PREFILL_ENV: "5000", BLOCK_ENV: "16"}
    with FakeEngine(MODEL, ["smol"], "--tokens", "2", env=env) as eng:
        yield eng


def test_prefills_queue_as_waiting_and_one_queued_behind_its_prefix_hits_it(
    slow_prefill: FakeEngine,
) -> None:
    body = {"prompt": _words("queued", 400), "max_tokens": 2}  # 25 blocks
    url = f"{slow_prefill.url}/v1/completions"
    _stats(slow_prefill, reset=True)

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(session.post(url, json=body))
            # Prefilling counts as waiting, not running; one queued behind it waits too.
            await asyncio.to_thread(wait_until, lambda: _queue(slow_prefill) == (1, 0))
            second = asyncio.ensure_future(session.post(url, json=body))
            await asyncio.to_thread(wait_until, lambda: _queue(slow_prefill) == (2, 0))
            for task in (first, second):
                response = await task
                assert response.status == 200
                response.release()

    asyncio.run(go())
    # The second was looked up once the first's prefill was done: all 25 blocks hit.
    assert _stats(slow_prefill) == {"queries": 800, "hits": 400, "blocks": 25}
    assert _queue(slow_prefill) == (0, 0)


def test_kv_cache_usage_counts_the_blocks_in_flight_and_the_fleets_parser_reads_it() -> None:
    env = {BLOCK_ENV: "4", BLOCKS_ENV: "100"}
    args = ("--token-delay", "0.02", "--tokens", "100000")
    with FakeEngine(MODEL, ["smol"], *args, env=env) as eng:

        async def go() -> None:
            body = {"prompt": _words("kv", 10), "stream": True}
            async with aiohttp.ClientSession() as session:
                stream = asyncio.ensure_future(session.post(f"{eng.url}/v1/completions", json=body))
                await asyncio.to_thread(wait_until, lambda: _load(eng).generation_tokens >= 3)
                async with session.post(f"{eng.url}/fake/hang") as resp:
                    assert resp.status == 200
                frozen = await asyncio.to_thread(_load, eng)  # no token moves any more
                blocks = math.ceil((10 + frozen.generation_tokens) / 4)
                assert frozen.running == 1
                assert frozen.kv_cache == pytest.approx(blocks / 100)
                (await stream).close()  # the client goes: the request ends, its blocks free
                await asyncio.to_thread(wait_until, lambda: _load(eng).running == 0)
                assert (await asyncio.to_thread(_load, eng)).kv_cache == 0.0

        asyncio.run(go())
