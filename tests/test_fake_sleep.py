"""The fake engine's sleep mode, dev-mode routes and GPU ledger (fake_sleep.py), as vLLM's
sleep mode behaves (shared/notes/vllm-facts.md "Sleep mode"): real subprocesses, real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_fleet.testing.fake_sleep import DEV_ROUTES, overlaps, read_ledger
from vllm_fleet.testing.harness import FakeEngine, engine_request, port_open, wait_port

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEV = {"VLLM_SERVER_DEV_MODE": "1"}
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}]}


def _call(eng: FakeEngine, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """One request to the engine: its status and decoded JSON (None for an empty body)."""
    data = None if body is None else json.dumps(body).encode()
    if method == "POST" and data is None:
        data = b""
    status, raw = engine_request(eng.url, path, method, data, timeout=30)
    return status, json.loads(raw) if raw else None


def _sleep_engine(*extra: str, env: dict[str, str] | None = None, **kwargs: Any) -> FakeEngine:
    return FakeEngine(
        MODEL, ["smol"], "--enable-sleep-mode", *extra, env={**DEV, **(env or {})}, **kwargs
    )


def _metrics(eng: FakeEngine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, raw = engine_request(eng.url, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(raw.decode())
        for sample in family.samples
    }


def _sleep_state(eng: FakeEngine) -> dict[str, float]:
    """`vllm:engine_sleep_state` by its `sleep_state` label."""
    found = {}
    for (name, labels), value in _metrics(eng).items():
        if name == "vllm:engine_sleep_state":
            found[dict(labels)["sleep_state"]] = value
            assert dict(labels)["model_name"] == "smol"
    return found


def _generated(eng: FakeEngine) -> float:
    metrics = _metrics(eng)
    return next(v for (name, _), v in metrics.items() if name == "vllm:generation_tokens_total")


def _assert_refused_as_sleeping(status: int, body: Any) -> None:
    assert status == 503, body
    assert body["error"]["type"] == "ServiceUnavailableError"
    assert "sleeping" in body["error"]["message"]


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _stream(session: aiohttp.ClientSession, url: str, out: list[dict[str, Any]]) -> float:
    """Read a streamed completion into `out`; the monotonic time its `[DONE]` came."""
    body = {"model": "smol", "prompt": "x", "stream": True}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for raw in resp.content:
            line = raw.strip()
            if line == b"data: [DONE]":
                return time.monotonic()
            if line.startswith(b"data: "):
                out.append(json.loads(line[len(b"data: ") :]))
    raise AssertionError("the stream ended without data: [DONE]")


def _texts(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["text"]]


def _finishes(chunks: list[dict[str, Any]]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]


def _run(test: Coroutine[Any, Any, None]) -> None:
    """Run an async test body; a hang fails it (in a minute) instead of blocking the run."""
    asyncio.run(asyncio.wait_for(test, 60))


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    result = await call
    return result, time.monotonic()


def test_dev_routes_are_404_without_dev_mode() -> None:
    with _sleep_engine(env={"VLLM_SERVER_DEV_MODE": "0"}) as eng:
        for method, path in DEV_ROUTES:
            status, body = _call(eng, path, method)
            assert status == 404, (method, path, body)
            assert body["error"]["message"] == "Not Found"
        assert _call(eng, "/v1/chat/completions", "POST", CHAT)[0] == 200


def test_dev_mode_without_sleep_mode_has_the_routes_but_cannot_sleep() -> None:
    with FakeEngine(MODEL, ["smol"], env=DEV) as eng:
        for method, path in DEV_ROUTES:
            assert _call(eng, path, method, {"method": "x"})[0] != 404, (method, path)
        status, body = _call(eng, "/sleep", "POST")
        assert status == 500
        assert body["error"]["message"] == "Sleep mode is not enabled in the model config"
        assert _call(eng, "/wake_up", "POST")[0] == 500
        assert _call(eng, "/is_sleeping") == (200, {"is_sleeping": False})
        assert _call(eng, "/v1/chat/completions", "POST", CHAT)[0] == 200
        assert "vllm:engine_sleep_state" not in {name for name, _ in _metrics(eng)}


def test_sleep_level_1_refuses_generation_until_woken() -> None:
    with _sleep_engine("--tokens", "3") as eng:
        assert _sleep_state(eng) == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
        assert _call(eng, "/sleep?level=1", "POST") == (200, {"status": "sleeping", "level": 1})
        assert _call(eng, "/is_sleeping") == (200, {"is_sleeping": True})
        _assert_refused_as_sleeping(*_call(eng, "/v1/chat/completions", "POST", CHAT))
        embed = {"model": "smol", "input": "hello"}
        _assert_refused_as_sleeping(*_call(eng, "/v1/embeddings", "POST", embed))
        assert engine_request(eng.url, "/health") == (200, b"")
        assert _sleep_state(eng) == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
        stats = _call(eng, "/fake/stats")[1]
        assert (stats["sleeping"], stats["is_sleeping"], stats["sleeps"]) == (1, True, 1)

        status, body = _call(eng, "/wake_up", "POST")
        assert (status, body) == (200, {"status": "awake", "tags_woken": None})
        assert _call(eng, "/is_sleeping") == (200, {"is_sleeping": False})
        status, reply = _call(eng, "/v1/chat/completions", "POST", CHAT)
        assert status == 200 and reply["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        assert _sleep_state(eng)["awake"] == 1.0
        stats = _call(eng, "/fake/stats")[1]
        assert (stats["sleeping"], stats["is_sleeping"], stats["wakes"]) == (0, False, 1)


@pytest.mark.parametrize(
    ("level", "state"),
    [
        (0, {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 0.0}),
        (2, {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}),
    ],
)
def test_sleep_state_gauge_names_the_level(level: int, state: dict[str, float]) -> None:
    with _sleep_engine() as eng:
        assert _call(eng, f"/sleep?level={level}", "POST")[0] == 200
        assert _call(eng, "/is_sleeping")[1] == {"is_sleeping": True}
        assert _sleep_state(eng) == state
        _assert_refused_as_sleeping(*_call(eng, "/v1/chat/completions", "POST", CHAT))
        assert _call(eng, "/wake_up", "POST")[0] == 200
        assert _sleep_state(eng)["awake"] == 1.0
        assert _call(eng, "/v1/chat/completions", "POST", CHAT)[0] == 200


def test_wake_with_tags_weights_stays_asleep_until_kv_cache() -> None:
    with _sleep_engine() as eng:
        assert _call(eng, "/sleep", "POST")[0] == 200  # level 1 by default
        status, body = _call(eng, "/wake_up?tags=weights", "POST")
        assert (status, body) == (200, {"status": "sleeping", "tags_woken": ["weights"]})
        assert _call(eng, "/is_sleeping")[1] == {"is_sleeping": True}
        _assert_refused_as_sleeping(*_call(eng, "/v1/chat/completions", "POST", CHAT))
        assert _sleep_state(eng)["weights_offloaded"] == 1.0
        status, body = _call(eng, "/wake_up?tags=kv_cache", "POST")
        assert (status, body) == (200, {"status": "awake", "tags_woken": ["kv_cache"]})
        assert _call(eng, "/is_sleeping")[1] == {"is_sleeping": False}
        assert _call(eng, "/v1/chat/completions", "POST", CHAT)[0] == 200
        # Both tags at once wake fully too.
        assert _call(eng, "/sleep", "POST")[0] == 200
        both = _call(eng, "/wake_up?tags=weights&tags=kv_cache", "POST")[1]
        assert both == {"status": "awake", "tags_woken": ["weights", "kv_cache"]}


def test_abort_mode_ends_the_requests_in_flight_before_sleeping() -> None:
    with _sleep_engine("--token-delay", "0.02", "--tokens", "100000") as eng:

        async def go() -> None:
            chunks: list[dict[str, Any]] = []
            async with aiohttp.ClientSession() as session:
                stream = asyncio.ensure_future(_stream(session, eng.url, chunks))
                plain = asyncio.ensure_future(
                    session.post(f"{eng.url}/v1/completions", json={"prompt": "x"})
                )
                await _until(lambda: len(_texts(chunks)) >= 3)
                await _until(lambda: _call(eng, "/fake/stats")[1]["in_flight"] == 2)
                answer, slept_at = await _timed(session.post(f"{eng.url}/sleep"))  # abort
                assert answer.status == 200
                ended_at = await stream
                assert ended_at <= slept_at  # the stream was over before the sleep's answer
                assert 3 <= len(_texts(chunks)) < 100000
                assert _finishes(chunks) == ["abort"]
                refused = await plain
                assert refused.status == 503
                assert "aborted" in (await refused.json())["error"]["message"]
            stats = _call(eng, "/fake/stats")[1]
            assert (stats["aborted_by_sleep"], stats["in_flight"]) == (2, 0)
            assert _call(eng, "/is_sleeping")[1] == {"is_sleeping": True}

        _run(go())


def test_wait_mode_answers_only_after_the_stream_finished() -> None:
    with _sleep_engine("--token-delay", "0.02", "--tokens", "40") as eng:

        async def go() -> None:
            chunks: list[dict[str, Any]] = []
            async with aiohttp.ClientSession() as session:
                stream = asyncio.ensure_future(_stream(session, eng.url, chunks))
                await _until(lambda: len(_texts(chunks)) >= 2)
                answer, slept_at = await _timed(session.post(f"{eng.url}/sleep?mode=wait"))
                assert answer.status == 200
                ended_at = await stream
            assert ended_at <= slept_at
            assert len(_texts(chunks)) == 40 and _finishes(chunks) == ["stop"]
            assert _call(eng, "/is_sleeping")[1] == {"is_sleeping": True}

        _run(go())


def test_keep_mode_pauses_the_stream_until_the_wake() -> None:
    with _sleep_engine("--token-delay", "0.02", "--tokens", "30") as eng:

        async def go() -> None:
            chunks: list[dict[str, Any]] = []
            async with aiohttp.ClientSession() as session:
                stream = asyncio.ensure_future(_stream(session, eng.url, chunks))
                await _until(lambda: len(_texts(chunks)) >= 2)
                async with session.post(f"{eng.url}/sleep?mode=keep") as answer:
                    assert answer.status == 200
                frozen = _generated(eng)
                await asyncio.sleep(0.3)
                assert _generated(eng) == frozen  # no token while asleep
                assert not stream.done()
                async with session.post(f"{eng.url}/wake_up") as answer:
                    assert answer.status == 200
                await stream
            assert len(_texts(chunks)) == 30 and _finishes(chunks) == ["stop"]

        _run(go())


def test_ledger_holds_from_loading_releases_asleep_and_at_sigterm(tmp_path: Path) -> None:
    ledger = tmp_path / "gpu.ledger"
    env = {"FAKE_VLLM_GPU_LEDGER": str(ledger)}
    eng = _sleep_engine("--startup-delay", "2", "--fake-wake-delay", "1", env=env, wait=False)
    eng.start()
    assert eng.proc is not None
    try:
        who = f"smol@{eng.port}"
        deadline = time.monotonic() + 15
        while not (ledger.exists() and read_ledger(ledger)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not port_open(eng.port)  # held while loading
        assert [e[1:] for e in read_ledger(ledger)] == [(who, "hold")]
        wait_port(eng.port, proc=eng.proc)
        # ...from its start: the port opened --startup-delay (2 s) after the hold line.
        assert read_ledger(ledger)[0][0] < time.time() - 1

        assert _call(eng, "/sleep", "POST")[0] == 200
        assert [e[1:] for e in read_ledger(ledger)] == [(who, "hold"), (who, "release")]

        with ThreadPoolExecutor(1) as pool:
            wake = pool.submit(_call, eng, "/wake_up", "POST")
            while len(read_ledger(ledger)) < 3:
                assert time.monotonic() < deadline + 15
                time.sleep(0.02)
            assert not wake.done()  # held from the start of the wake
            assert wake.result()[0] == 200
        assert read_ledger(ledger)[2][1:] == (who, "hold")

        eng.proc.send_signal(signal.SIGTERM)
        assert eng.proc.wait(10) == 0
        entries = read_ledger(ledger)
        assert [e[1:] for e in entries] == [(who, e) for e in ("hold", "release") * 2]
        times = [e[0] for e in entries]
        assert times == sorted(times)
        assert overlaps(entries) == []
    finally:
        eng.stop()


def test_ledger_release_when_killed_while_loading(tmp_path: Path) -> None:
    ledger = tmp_path / "gpu.ledger"
    env = {"FAKE_VLLM_GPU_LEDGER": str(ledger)}
    eng = FakeEngine(MODEL, ["smol"], "--startup-delay", "60", env=env, wait=False).start()
    assert eng.proc is not None
    try:
        deadline = time.monotonic() + 15
        while not (ledger.exists() and read_ledger(ledger)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        eng.proc.send_signal(signal.SIGTERM)
        assert eng.proc.wait(10) == -signal.SIGTERM  # dies as before, having written
        who = f"smol@{eng.port}"
        assert [e[1:] for e in read_ledger(ledger)] == [(who, "hold"), (who, "release")]
    finally:
        eng.stop()


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[Path, list[FakeEngine]]]:
    ledger = tmp_path / "gpu.ledger"
    env = {"FAKE_VLLM_GPU_LEDGER": str(ledger)}
    engines = [
        FakeEngine(MODEL, [name], "--enable-sleep-mode", env={**DEV, **env})
        for name in ("a", "b", "c")
    ]
    try:
        yield ledger, engines
    finally:
        for eng in engines:
            eng.stop()


def test_engines_sharing_a_ledger_overlap_only_when_both_hold(
    three: tuple[Path, list[FakeEngine]],
) -> None:
    ledger, (a, b, c) = three
    a.start()
    assert _call(a, "/sleep", "POST")[0] == 200
    b.start()
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0
    assert _call(a, "/wake_up", "POST")[0] == 200
    assert overlaps(read_ledger(ledger)) == []  # one after the other
    c.start()
    assert c.proc is not None
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0
    found = overlaps(read_ledger(ledger))
    assert len(found) == 1, found
    assert found[0].startswith(f"a@{a.port} and c@{c.port} both held from ")
    assert "the end" not in found[0]  # c released at its exit


def test_overlaps_in_hand_made_ledgers(tmp_path: Path) -> None:
    def ledger(text: str) -> list[tuple[float, str, str]]:
        path = tmp_path / "ledger"
        path.write_text(text)
        return read_ledger(path)

    together = ledger(
        "1.000000 a@x hold\n2.000000 b@y hold\n3.000000 a@x release\n4.000000 b@y release\n"
    )
    assert together[0] == (1.0, "a@x", "hold")
    assert overlaps(together) == ["a@x and b@y both held from 2.000000 to 3.000000"]
    one_after_the_other = ledger(
        "1.0 a@x hold\n2.0 a@x release\n2.0 b@y hold\n3.0 b@y release\n3.5 a@x hold\n"
    )
    assert overlaps(one_after_the_other) == []
    # An engine that never released (SIGKILLed, or still running) holds to the end.
    never_released = ledger("1.0 a@x hold\n2.0 a@x release\n5.0 b@y hold\n6.0 a@x hold\n")
    assert overlaps(never_released) == ["a@x and b@y both held from 6.000000 to the end"]
    with pytest.raises(ValueError):
        ledger("1.0 a@x hold\nnot a ledger line\n")
