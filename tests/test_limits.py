"""Per-key limits: requests per minute, requests at once, tokens per minute (reserved at
admission, settled with the engine's usage), with OpenAI's headers. The buckets are
tested on a clock the test moves; the gateway with fake engines and the `openai` SDK,
whose own retry must honour the gateway's Retry-After."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.config.models import KeyLimits
from vllm_fleet.gateway.errors import Reply
from vllm_fleet.gateway.keys import Client
from vllm_fleet.gateway.limits import Limiter, Ticket, duration
from vllm_fleet.testing.harness import FakeEngine

CHAT = "org/chat"


def client(**limits: int) -> Client:
    return Client("team", None, False, KeyLimits(**limits))


def test_rpm_lets_a_minutes_burst_through_then_refills_at_its_rate() -> None:
    limiter, team = Limiter(), client(rpm=60)
    for _ in range(60):
        assert isinstance(limiter.admit(team, "chat", 0, 100.0), Ticket)
    refused = limiter.admit(team, "chat", 0, 100.0)
    assert isinstance(refused, Reply) and refused.status == 429
    headers = dict(refused.headers)
    assert headers["Retry-After"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert b"60 requests per minute" in refused.body
    assert isinstance(limiter.admit(team, "chat", 0, 101.0), Ticket)  # one a second back


def test_max_concurrent_counts_requests_until_they_settle() -> None:
    limiter, team = Limiter(), client(max_concurrent=2)
    first, second = limiter.admit(team, "chat", 0, 0.0), limiter.admit(team, "chat", 0, 0.0)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert isinstance(limiter.admit(team, "chat", 0, 0.0), Reply)
    first.settle(5, 0.0)
    first.settle(5, 0.0)  # settled once only
    assert isinstance(limiter.admit(team, "chat", 0, 0.0), Ticket)
    assert isinstance(limiter.admit(team, "chat", 0, 0.0), Reply)


def test_tokens_are_reserved_at_admission_and_settled_with_real_usage() -> None:
    limiter, team = Limiter(), client(tpm=1000)
    running = limiter.admit(team, "chat", 600, 0.0)
    assert isinstance(running, Ticket)
    # While it runs, its 600 are held: a second request of 600 does not fit.
    refused = limiter.admit(team, "chat", 600, 0.0)
    assert isinstance(refused, Reply) and b"tokens per minute" in refused.body
    assert dict(refused.headers)["x-ratelimit-remaining-tokens"] == "400"
    running.settle(100, 0.0)  # it used 100: 500 come back at once
    assert isinstance(limiter.admit(team, "chat", 600, 0.0), Ticket)


def test_a_request_over_the_whole_token_limit_is_refused_for_what_it_asks() -> None:
    refused = Limiter().admit(client(tpm=1000), "chat", 5000, 0.0)
    assert isinstance(refused, Reply) and refused.status == 429
    assert b"tokens_over_limit" in refused.body and b"max_tokens" in refused.body


def test_per_deployment_limits_apply_beside_the_keys_own() -> None:
    limiter = Limiter()
    team = Client("team", None, False, KeyLimits(rpm=100), {"big": KeyLimits(rpm=1)})
    assert isinstance(limiter.admit(team, "big", 0, 0.0), Ticket)
    refused = limiter.admit(team, "big", 0, 0.0)
    assert isinstance(refused, Reply) and b"on `big`" in refused.body
    assert isinstance(limiter.admit(team, "small", 0, 0.0), Ticket)


def test_a_reload_keeps_what_was_used_under_the_new_limit() -> None:
    limiter = Limiter()
    for _ in range(10):
        assert isinstance(limiter.admit(client(rpm=10), "chat", 0, 0.0), Ticket)
    # The same key with a new limit (a reload makes new objects): 10 used of 20.
    raised = client(rpm=20)
    for _ in range(10):
        assert isinstance(limiter.admit(raised, "chat", 0, 0.0), Ticket)
    assert isinstance(limiter.admit(raised, "chat", 0, 0.0), Reply)


def test_durations_read_as_openai_writes_them() -> None:
    assert duration(0.02) == "20ms"
    assert duration(1.5) == "1.5s"
    assert duration(360.0) == "6m0s"


# ---------------------------------------------------------------- through the gateway


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(CHAT, [CHAT, "chat"], "--token-delay", "0.05") as started:
        yield started


@pytest.fixture(scope="module")
def gateway(engine: FakeEngine) -> Iterator[GatewayThread]:
    fleet = f"""
gateway:
  usage_db: null
  keys:
    - {{name: rpm, key: sk-rpm, rpm: 60}}
    - {{name: one, key: sk-one, max_concurrent: 1}}
    - {{name: tpm, key: sk-tpm, tpm: 1000}}
deployments:
  chat: {{model: {CHAT}, endpoints: ["{engine.url}"]}}
"""
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def sdk(gw: GatewayThread, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/chat/v1", api_key=key, max_retries=retries)


def ask(client: openai.OpenAI, max_tokens: int = 1) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )


def test_answers_carry_the_rate_limit_headers(gateway: GatewayThread) -> None:
    raw = sdk(gateway, "sk-tpm").chat.completions.with_raw_response.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1000
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert "x-ratelimit-limit-requests" not in raw.headers  # that key has no rpm


def test_over_rpm_the_sdks_own_retry_waits_and_gets_through(gateway: GatewayThread) -> None:
    quick = sdk(gateway, "sk-rpm")
    refused = 0
    for _ in range(70):  # the minute's 60, then 429s
        try:
            ask(quick)
        except openai.RateLimitError as exc:
            refused += 1
            assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert exc.response.headers["retry-after"] == "1"
            break
    assert refused == 1
    # The SDK reads Retry-After (1 s) and retries: the request gets through.
    assert ask(sdk(gateway, "sk-rpm", retries=2)).choices[0].message.content
    text = httpx.get(gateway.url + "/metrics", headers={"api-key": "sk-rpm"})
    assert text.status_code == 403  # not an admin key


def test_max_concurrent_refuses_a_second_request_while_one_streams(
    gateway: GatewayThread,
) -> None:
    client = sdk(gateway, "sk-one")
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=40, stream=True
    )
    first = next(iter(stream))  # the stream is running
    assert first.choices
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client)
    assert "1 requests at once" in str(refused.value)
    assert sum(1 for _ in stream) > 0
    stream.close()
    assert ask(client).choices  # its place is free again


def test_a_stream_that_would_pass_the_tokens_left_is_refused_at_admission(
    gateway: GatewayThread,
) -> None:
    client = sdk(gateway, "sk-tpm")
    with pytest.raises(openai.RateLimitError) as too_big:
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=5000, stream=True
        )
    assert too_big.value.code == "tokens_over_limit"
    # One stream reserves 600 of the 1000; a second of 600 does not fit while it runs.
    reserve = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=600, stream=True
    )
    next(iter(reserve))
    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, max_tokens=600)
    assert "1000 tokens per minute" in str(refused.value)
    reserve.close()  # cut off before its usage: charged what it reserved, not refunded
    for _ in range(50):
        raw = client.chat.completions.with_raw_response.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        if int(raw.headers["x-ratelimit-remaining-tokens"]) < 600:
            break
        time.sleep(0.05)  # the gateway notices the client left on its next read
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 600


def test_keys_without_limits_get_no_rate_headers(engine: FakeEngine) -> None:
    fleet = f"""
gateway:
  usage_db: null
  keys: [{{name: free, key: sk-free}}]
deployments:
  chat: {{model: {CHAT}, endpoints: ["{engine.url}"]}}
"""
    gw = GatewayThread(fleet).start()
    try:
        raw = sdk(gw, "sk-free").chat.completions.with_raw_response.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert raw.parse().choices
        assert not any(h.startswith("x-ratelimit") for h in raw.headers)
    finally:
        gw.stop()
