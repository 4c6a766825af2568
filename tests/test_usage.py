"""Tokens counted from the engine's own `usage`: the SSE usage event found without parsing
the other chunks (and left out for a client that did not ask for it), non-streamed
bodies, and the ledger rows the gateway writes, which must equal the engine's usage
exactly and survive a restart of the gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.gateway.usage import Meter, body_tokens
from vllm_fleet.ledger import read_usage
from vllm_fleet.testing.harness import FakeEngine

CHAT = "org/chat"
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
TOKEN = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def relay(meter: Meter, *reads: bytes) -> bytes:
    meter.start(sse=True, json_body=False)
    return b"".join(meter.feed(r) for r in reads) + meter.end()


def test_the_usage_event_is_read_and_left_out_when_the_client_did_not_ask() -> None:
    meter = Meter(drop_usage=True)
    assert relay(meter, TOKEN, TOKEN + USAGE + DONE) == TOKEN + TOKEN + DONE
    assert meter.usage == (7, 3)


def test_the_usage_event_stays_when_the_client_asked() -> None:
    meter = Meter(drop_usage=False)
    assert relay(meter, TOKEN, USAGE, DONE) == TOKEN + USAGE + DONE
    assert meter.usage == (7, 3)


@pytest.mark.parametrize("cut", [5, 20, 40, len(USAGE) - 1])
def test_a_usage_event_split_across_reads_is_still_found(cut: int) -> None:
    meter = Meter(drop_usage=True)
    out = relay(meter, TOKEN + USAGE[:cut], USAGE[cut:] + DONE)
    assert out == TOKEN + DONE and meter.usage == (7, 3)


def test_an_unfinished_event_is_held_only_until_it_is_whole() -> None:
    meter = Meter(drop_usage=True)
    meter.start(sse=True, json_body=False)
    assert meter.feed(TOKEN + TOKEN[:10]) == TOKEN
    assert meter.feed(TOKEN[10:]) == TOKEN


def test_a_chunk_whose_usage_rides_with_choices_is_never_dropped() -> None:
    both = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    meter = Meter(drop_usage=True)
    assert relay(meter, both, DONE) == both + DONE
    assert meter.usage == (1, 2)


def test_non_streamed_bodies_and_the_responses_api_names() -> None:
    assert body_tokens(b'{"usage": {"prompt_tokens": 4, "completion_tokens": 5}}') == (4, 5)
    assert body_tokens(b'{"usage":{"input_tokens":4,"output_tokens":6}}') == (4, 6)
    assert body_tokens(b'{"usage":{"prompt_tokens":4}}') == (4, 0)  # embeddings
    assert body_tokens(b'{"data": []}') is None
    assert body_tokens(b'{"usage": not json') is None


# ---------------------------------------------------------------- through the gateway


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(CHAT, [CHAT, "chat"]) as started:
        yield started


def fleet(engine: FakeEngine, db: Path) -> str:
    return f"""
gateway:
  usage_db: {db}
  keys:
    - {{name: team-a, key: sk-a}}
    - {{name: ops, key: sk-ops, admin: true}}
deployments:
  chat: {{model: {CHAT}, endpoints: ["{engine.url}"]}}
"""


def sdk(gw: GatewayThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/chat/v1", api_key="sk-a", max_retries=0)


MESSAGES = [{"role": "user", "content": "count the tokens of this prompt please"}]


def test_ledger_rows_equal_the_engines_usage_and_survive_a_restart(
    engine: FakeEngine, tmp_path: Path
) -> None:
    db = tmp_path / "usage.db"
    expected = [0, 0]
    gw = GatewayThread(fleet(engine, db)).start()
    try:
        done = sdk(gw).chat.completions.create(model="x", messages=MESSAGES, max_tokens=5)
        assert done.usage is not None
        expected[0] += done.usage.prompt_tokens
        expected[1] += done.usage.completion_tokens
        # A stream whose client asks for usage: the engine's usage event reaches it.
        chunks = list(
            sdk(gw).chat.completions.create(
                model="x",
                messages=MESSAGES,
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        expected[0] += usage.prompt_tokens
        expected[1] += usage.completion_tokens
        # A stream whose client did not ask: counted all the same, never shown to it.
        plain = list(
            sdk(gw).chat.completions.create(model="x", messages=MESSAGES, max_tokens=9, stream=True)
        )
        assert all(c.usage is None and c.choices for c in plain)
        expected[0] += usage.prompt_tokens  # the same prompt
        expected[1] += 9  # the fake engine makes exactly max_tokens
        report = httpx.get(
            gw.url + "/fleet/usage?by=key", headers={"Authorization": "Bearer sk-ops"}
        ).json()
        assert report["rows"] == [
            {
                "key": "team-a",
                "requests": 3,
                "errors": 0,
                "prompt_tokens": expected[0],
                "completion_tokens": expected[1],
                "total_tokens": sum(expected),
            }
        ]
    finally:
        gw.stop()
    # The gateway again, on the same ledger: the totals go on from where they were.
    gw = GatewayThread(fleet(engine, db)).start()
    try:
        sdk(gw).chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.NotFoundError):  # an error, counted as one
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-a", max_retries=0).models.retrieve(
                "nope"
            )
    finally:
        gw.stop()
    rows = read_usage(db, None, "both")["rows"]
    team = [r for r in rows if r["key"] == "team-a" and r["deployment"] == "chat"]
    assert team[0]["requests"] == 4
    assert team[0]["completion_tokens"] == expected[1] + 2


def test_a_client_that_did_not_ask_sees_the_stream_the_engine_sends_without_the_gateway(
    engine: FakeEngine, tmp_path: Path
) -> None:
    gw = GatewayThread(fleet(engine, tmp_path / "u.db")).start()
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    try:
        through = httpx.post(
            f"{gw.url}/chat/v1/chat/completions", json=body, headers={"api-key": "sk-a"}
        ).text
    finally:
        gw.stop()
    direct = httpx.post(f"{engine.url}/v1/chat/completions", json=body).text

    def shape(text: str) -> list[object]:
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        return [
            sorted(json.loads(e)) if e != "[DONE]" else e for e in events
        ]  # field names per event: ids and times differ

    assert shape(through) == shape(direct)


def test_the_access_log_has_one_line_per_request_and_no_secret(
    engine: FakeEngine, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    text = fleet(engine, tmp_path / "u.db").replace(
        "gateway:\n", f"gateway:\n  access_log: {log}\n"
    )
    gw = GatewayThread(text).start()
    try:
        done = sdk(gw).chat.completions.create(model="x", messages=MESSAGES, max_tokens=3)
        list(sdk(gw).chat.completions.create(model="x", messages=MESSAGES, stream=True))
        assert httpx.get(gw.url + "/v1/models", headers={"api-key": "sk-wrong"}).status_code == 401
    finally:
        gw.stop()  # the log's last lines are written as the gateway stops
    raw = log.read_text()
    assert "sk-a" not in raw and "sk-wrong" not in raw and "count the tokens" not in raw
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [(r["route"], r["status"], r["key"]) for r in lines] == [
        ("path", 200, "team-a"),
        ("path", 200, "team-a"),
        (None, 401, None),
    ]
    first, stream = lines[0], lines[1]
    assert done.usage is not None
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        done.usage.prompt_tokens,
        done.usage.completion_tokens,
    )
    assert first["deployment"] == "chat" and first["method"] == "POST"
    assert first["path"] == "/chat/v1/chat/completions" and first["client"] == "127.0.0.1"
    assert first["bytes_in"] > 0 and first["bytes_out"] > 0
    assert 0 < first["ttfb_ms"] <= first["latency_ms"]
    assert stream["completion_tokens"] == 16  # the fake engine's default answer, counted


def test_a_stream_left_after_its_usage_event_counts_as_answered(tmp_path: Path) -> None:
    """The client may close as soon as it has [DONE], before the engine's last chunk
    reaches the gateway: answered, its usage charged; left before that: 499."""
    from vllm_fleet.config import loads
    from vllm_fleet.gateway.accounting import Accounting
    from vllm_fleet.gateway.metrics import GatewayMetrics
    from vllm_fleet.gateway.relay.request import Request
    from vllm_fleet.gpus import Inventory
    from vllm_fleet.plan import build_plan
    from vllm_fleet.registry import Registry

    config = loads(f"gateway: {{usage_db: {tmp_path / 'u.db'}}}\ndeployments: {{a: {{model: m}}}}")
    plan = build_plan(config, Inventory(None, "test"), "python")
    accounting = Accounting(GatewayMetrics(Registry(config, plan)))
    accounting.reconfigure(config)
    for events in (TOKEN + USAGE + DONE, TOKEN):
        request = Request()
        request.deployment, request.status, request.responded = "a", 200, True
        request.meter = Meter(drop_usage=True)
        relay(request.meter, events)
        accounting.finished(request, b"127.0.0.1", cut=True)
    accounting.close()
    rows = read_usage(tmp_path / "u.db", None, "both")["rows"]
    assert [(r["requests"], r["errors"], r["completion_tokens"]) for r in rows] == [(2, 1, 3)]


def test_the_ledger_survives_a_restart_of_fleet_up(tmp_path: Path) -> None:
    """`fleet up` with the default ledger (.fleet/usage.db beside the fleet file), stopped
    with SIGTERM and started again: `fleet usage` counts the requests of both runs."""
    import subprocess
    import sys

    from tests.conftest import fake_fleet_file
    from tests.test_fleet_up import FleetUp

    path = fake_fleet_file(tmp_path, {"chat": {"model": CHAT}})
    used = [0, 0]
    for _ in range(2):
        fleet = FleetUp(path)
        try:
            fleet.wait_ready(1)
            client = openai.OpenAI(base_url=f"{fleet.url}/chat/v1", api_key="-", max_retries=0)
            done = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=3)
            assert done.usage is not None
            used[0] += done.usage.prompt_tokens
            used[1] += done.usage.completion_tokens
        finally:
            assert fleet.stop() == 0, fleet.text()
    assert (tmp_path / ".fleet" / "usage.db").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "usage", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(shown.stdout)["rows"]
    assert [(r["key"], r["deployment"], r["requests"]) for r in rows] == [("-", "chat", 2)]
    assert [rows[0]["prompt_tokens"], rows[0]["completion_tokens"]] == used
