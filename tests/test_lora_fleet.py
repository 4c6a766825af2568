"""LoRA adapters as deployments with real processes: `fleet up` on fake engines that serve
adapters as vLLM 0.32 does (testing/fake_lora.py; an adapter answers `<name>:tok0 ...`),
reached on every route style with the openai SDK, added and removed by a reload without
restarting their base, loaded again after the base restarts, and a failed load shown
with vLLM's message."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import fake_fleet_file, wait_until
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture
from tests.test_reload import fleet_cli
from vllm_fleet.testing.fake_lora import write_adapter
from vllm_fleet.testing.harness import engine_json, engine_request

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def call(url: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def chat(url: str, dep: str) -> tuple[int, dict[str, Any]]:
    return call(url, f"/{dep}/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})


def engines(fleet: FleetUp, dep: str) -> list[dict[str, Any]]:
    status = fleet.status() or {}
    ups: list[dict[str, Any]] = status["deployments"][dep]["upstreams"]
    return ups


def start(fleets: list[FleetUp], tmp_path: Path, adapters: dict[str, Any], **base: Any) -> FleetUp:
    deployments = {"chat": {"model": "org/chat", "replicas": 2, **base}, **adapters}
    fleet = FleetUp(fake_fleet_file(tmp_path, deployments))
    fleets.append(fleet)
    fleet.wait_ready(deployments["chat"]["replicas"])
    return fleet


def test_an_adapter_answers_on_every_route_style_as_itself_and_the_base_as_the_base(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot", rank=8)
    fleet = start(fleets, tmp_path, {"bot": {"adapter": "./bot", "base": "chat", "aliases": ["b"]}})
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    by_model = client.chat.completions.create(model="bot", messages=MESSAGES, max_tokens=2)
    by_alias = client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=2)
    by_path = openai.OpenAI(base_url=f"{fleet.url}/bot/v1", api_key="none")
    # A path route sets `model` to the adapter, whatever the client sent.
    path_answer = by_path.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
    azure = openai.AzureOpenAI(
        azure_endpoint=fleet.url, azure_deployment="bot", api_version="2024-10-21", api_key="n"
    )
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in azure.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=2, stream=True
        )
        if chunk.choices
    )
    for answer in (by_model, by_alias, path_answer):
        assert answer.model == "bot"
        assert answer.choices[0].message.content == "bot:tok0 bot:tok1"
    assert streamed == "bot:tok0 bot:tok1"
    plain = openai.OpenAI(base_url=f"{fleet.url}/chat/v1", api_key="none")
    base = plain.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2)
    assert base.choices[0].message.content == "tok0 tok1" and base.model == "org/chat"

    status, models = call(fleet.url, "/v1/models")
    cards = {m["id"]: m for m in models["data"]}
    assert cards["bot"]["parent"] == "chat" and cards["bot"]["ready"] is True
    assert cards["chat"]["parent"] is None
    status, missing = chat(fleet.url, "nobody")
    assert status == 404 and "bot (adapter on chat)" in missing["error"]["message"]
    for path in (
        "/chat/v1/load_lora_adapter",
        "/v1/load_lora_adapter",
        "/bot/v1/unload_lora_adapter",
    ):
        status, refused = call(
            fleet.url, path, {"lora_name": "x", "lora_path": "/tmp", "model": "chat"}
        )
        assert status == 403, (path, refused)
        assert refused["error"]["code"] == "route_not_allowed"
    snapshot = fleet.status() or {}
    assert snapshot["adapters"]["bot"]["ready"] == 2
    for up in engines(fleet, "chat"):  # loaded into both replicas, by the fleet
        stats = engine_json(up["url"], "/fake/stats")
        assert stats["adapters"] == {"bot": str((tmp_path / "bot").resolve())}
    shown = fleet_cli("status", "--url", fleet.url)
    assert "bot on chat: loaded 2/2" in shown.stdout, shown.stdout


def test_a_reload_adds_and_removes_adapters_without_restarting_the_base(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot")
    write_adapter(tmp_path / "second")
    fleet = start(fleets, tmp_path, {"bot": {"adapter": "./bot", "base": "chat"}})
    pids = {u["name"]: u["pid"] for u in engines(fleet, "chat")}
    assert chat(fleet.url, "second")[0] == 404

    data = yaml.safe_load(fleet.path.read_text())
    data["deployments"]["second"] = {"adapter": "./second", "base": "chat"}
    fleet.path.write_text(yaml.safe_dump(data, sort_keys=False))
    reload = fleet_cli("reload", str(fleet.path), "--url", fleet.url, "--wait")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert "second (adapter): add" in reload.stdout
    assert "second: loaded on chat-0, chat-1" in reload.stdout
    status, answer = chat(fleet.url, "second")
    assert status == 200 and answer["model"] == "second"
    assert answer["choices"][0]["message"]["content"] == "second:tok0 second:tok1"

    del data["deployments"]["bot"]
    fleet.path.write_text(yaml.safe_dump(data, sort_keys=False))
    reload = fleet_cli("reload", str(fleet.path), "--url", fleet.url, "--wait")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert "bot: unloaded from chat-0, chat-1" in reload.stdout
    status, gone = chat(fleet.url, "bot")
    assert status == 404 and gone["error"]["code"] == "deployment_not_found"
    assert chat(fleet.url, "second")[0] == 200 and chat(fleet.url, "chat")[0] == 200
    assert {u["name"]: u["pid"] for u in engines(fleet, "chat")} == pids  # never restarted
    for up in engines(fleet, "chat"):
        stats = engine_json(up["url"], "/fake/stats")
        assert set(stats["adapters"]) == {"second"} and stats["lora_unloads"] == 1


def test_a_restarted_base_gets_its_adapters_back_before_it_is_ready(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot")
    fleet = start(fleets, tmp_path, {"bot": {"adapter": "./bot", "base": "chat"}}, replicas=1)
    (up,) = engines(fleet, "chat")
    with contextlib.suppress(OSError):  # it exits without answering
        engine_request(up["url"], "/fake/crash?status=1", "POST", b"")

    def restarted() -> dict[str, Any] | None:
        (now,) = engines(fleet, "chat")
        return now if now["state"] == "ready" and now["pid"] not in (None, up["pid"]) else None

    again = wait_until(restarted, timeout=30, what="the base restarted")
    # Ready means its adapters are loaded: the first request after it is the adapter's.
    assert again["adapters"] == {"bot": "loaded"}
    status, answer = chat(fleet.url, "bot")
    assert status == 200 and answer["model"] == "bot"
    assert engine_json(again["url"], "/fake/stats")["adapters"] == {
        "bot": str((tmp_path / "bot").resolve())
    }


def test_a_failed_load_is_shown_with_vllms_message_and_the_adapter_gets_a_503(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    # A Hugging Face id the fleet cannot look into: the engine tries and fails.
    fleet = start(fleets, tmp_path, {"hub": {"adapter": "someorg/missing-lora", "base": "chat"}})
    snapshot = fleet.status() or {}
    on = snapshot["adapters"]["hub"]["engines"]
    assert set(on) == {"chat-0", "chat-1"}
    for state in on.values():
        assert state.startswith("failed: Loading lora hub failed: No adapter found for"), state
        assert "(HTTP 404)" in state
    status, answer = chat(fleet.url, "hub")
    assert status == 503 and answer["error"]["code"] == "adapter_failed"
    assert "No adapter found" in answer["error"]["message"]
    assert chat(fleet.url, "chat")[0] == 200  # the base serves on
    shown = fleet_cli("status", "--url", fleet.url)
    assert "hub on chat: loaded 0/2" in shown.stdout and "No adapter found" in shown.stdout


def test_keys_reach_adapters_as_deployments_of_their_own(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot")
    deployments = {
        "chat": {"model": "org/chat"},
        "bot": {"adapter": "./bot", "base": "chat"},
    }
    keys = [{"name": "team", "key": "team-key", "deployments": ["bot"]}]
    fleet = FleetUp(fake_fleet_file(tmp_path, deployments, keys=keys))
    fleets.append(fleet)
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="team-key")
    answer = wait_until(lambda: _try(client, "bot"), timeout=20, what="the adapter answering")
    assert answer.model == "bot"
    try:
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)
    except openai.PermissionDeniedError as exc:
        assert "chat" in str(exc)
    else:
        raise AssertionError("a key for the adapter reached its base")
    listed = [m.id for m in client.models.list()]
    assert listed == ["bot"]


def _try(client: openai.OpenAI, model: str) -> Any:
    try:
        return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    except openai.APIStatusError as exc:
        if exc.status_code == 503:
            return None
        raise


def test_an_adapter_on_an_on_demand_base_loads_the_base_and_then_itself(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot")
    deployments = {
        "chat": {"model": "org/chat", "start": "on_demand", "idle_timeout": 2},
        "bot": {"adapter": "./bot", "base": "chat"},
    }
    fleet = FleetUp(fake_fleet_file(tmp_path, deployments))
    fleets.append(fleet)
    wait_until(lambda: fleet.status() is not None, timeout=20, what="the gateway")
    (up,) = engines(fleet, "chat")
    assert up["pid"] is None  # nothing runs before it is asked for
    # The first request names the adapter: it waits for the base, then for the adapter.
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    answer = client.chat.completions.create(model="bot", messages=MESSAGES, max_tokens=2)
    assert answer.model == "bot" and (answer.choices[0].message.content or "").startswith("bot:")
    (up,) = engines(fleet, "chat")
    assert up["adapters"] == {"bot": "loaded"}
    # Idle, the base is unloaded; the adapter's next request loads both again.
    wait_until(
        lambda: engines(fleet, "chat")[0]["pid"] is None, timeout=20, what="the idle base unloaded"
    )
    again = client.chat.completions.create(model="bot", messages=MESSAGES, max_tokens=2)
    assert again.model == "bot" and (again.choices[0].message.content or "").startswith("bot:")


def test_a_reload_with_an_adapter_that_fails_to_load_leaves_the_rest_serving(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot")
    adapters: dict[str, Any] = {"bot": {"adapter": "./bot", "base": "chat"}}
    fleet = start(fleets, tmp_path, adapters, replicas=1)
    pids = {u["name"]: u["pid"] for u in engines(fleet, "chat")}
    data = yaml.safe_load(fleet.path.read_text())
    # rank 8: what the running base holds, so the reload restarts nothing.
    data["deployments"]["hub"] = {"adapter": "someorg/missing-lora", "base": "chat", "rank": 8}
    fleet.path.write_text(yaml.safe_dump(data))
    done = fleet_cli("reload", str(fleet.path), "--url", fleet.url, "--wait")
    shown = done.stdout + done.stderr
    assert "hub" in shown and "No adapter found" in shown, shown
    status, answer = chat(fleet.url, "hub")
    assert status == 503 and answer["error"]["code"] == "adapter_failed"
    assert chat(fleet.url, "bot")[1]["model"] == "bot"
    assert chat(fleet.url, "chat")[0] == 200
    assert {u["name"]: u["pid"] for u in engines(fleet, "chat")} == pids


def test_a_reload_that_restarts_the_base_says_where_its_new_adapter_failed(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    write_adapter(tmp_path / "bot", rank=8)
    fleet = start(fleets, tmp_path, {"bot": {"adapter": "./bot", "base": "chat"}}, replicas=1)
    (old,) = engines(fleet, "chat")
    data = yaml.safe_load(fleet.path.read_text())
    # A hub id of unknown rank: 16 is assumed, over the running --max-lora-rank 8.
    data["deployments"]["hub"] = {"adapter": "someorg/missing-lora", "base": "chat"}
    fleet.path.write_text(yaml.safe_dump(data))
    done = fleet_cli("reload", str(fleet.path), "--url", fleet.url, "--wait")
    shown = done.stdout + done.stderr
    assert "over the running engine's 8" in shown and "as they start again" in shown, shown
    assert "hub on chat-0: Loading lora hub failed: No adapter found" in shown, shown
    assert "bot: loaded" not in shown  # bot did not change: it is no step of the reload
    (new,) = engines(fleet, "chat")
    assert new["pid"] != old["pid"] and set(new["adapters"]) == {"bot", "hub"}
    assert new["adapters"]["bot"] == "loaded" and new["adapters"]["hub"].startswith("failed: ")
    assert chat(fleet.url, "bot")[1]["model"] == "bot"
