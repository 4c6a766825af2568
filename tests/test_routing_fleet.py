"""Routing policies with real processes: `fleet up` on two fake engines per deployment,
multi-turn conversations sent with the openai SDK, and the replica that answered each
turn read from the `X-Fleet-Upstream` header of every answer."""

from __future__ import annotations

import random
import urllib.request
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import fake_fleet_file
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture
from tests.test_reload import fleet_cli


def start(fleets: list[FleetUp], tmp_path: Path, **deployments: dict[str, Any]) -> FleetUp:
    fleet = FleetUp(fake_fleet_file(tmp_path, deployments))
    fleets.append(fleet)
    fleet.wait_ready(sum(int(d.get("replicas", 1)) for d in deployments.values()))
    return fleet


def system_prompt(seed: int) -> str:
    rng = random.Random(seed)
    return f"You are assistant {seed}. " + " ".join(
        rng.choice(("plan", "route", "cache", "token", "prefix", "engine")) for _ in range(150)
    )


def converse(client: openai.OpenAI, model: str, seed: int, turns: int, **extra: Any) -> list[str]:
    """One conversation of `turns` turns, each turn's answer in its history; the replica
    that answered each turn."""
    messages: list[Any] = [{"role": "system", "content": system_prompt(seed)}]
    served = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"turn {turn} of conversation {seed}"})
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=4, **extra
        )
        served.append(raw.headers["x-fleet-upstream"])
        messages.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
    return served


def test_prefix_routing_keeps_each_conversation_on_one_replica_and_uses_both(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    fleet = start(
        fleets,
        tmp_path,
        chat={"model": "org/chat", "replicas": 2, "routing": "prefix"},
        plain={"model": "org/plain", "replicas": 2},
    )
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    homes = {}
    for seed in range(8):
        served = converse(client, "chat", seed, 5)
        assert len(set(served)) == 1, (seed, served)  # every turn where the first went
        homes[seed] = served[0]
    assert set(homes.values()) == {"chat-0", "chat-1"}, homes
    # Interleaved, turn by turn, they still find their replica.
    again = {seed: converse(client, "chat", seed, 3) for seed in range(8)}
    for seed, served in again.items():
        assert served == [homes[seed]] * 3, (seed, served)
    # The default policy spreads one conversation's turns over both replicas.
    plain = converse(client, "plain", 0, 6)
    assert set(plain) == {"plain-0", "plain-1"}, plain
    status = fleet.status() or {}
    stats = status["routing"]["chat"]
    assert stats["policy"] == "prefix" and stats["misses"] == 8 and stats["hits"] == 8 * 4 + 8 * 3
    assert "plain" not in status["routing"]
    with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    hits = 'fleet_routing_decisions_total{deployment="chat",outcome="hits",policy="prefix"} 56.0'
    assert hits in metrics, [m for m in metrics.splitlines() if "routing" in m]
    shown = fleet_cli("status", "--url", fleet.url).stdout
    assert "chat: prefix (56 to the replica holding its prefix" in shown, shown


def test_session_routing_follows_the_header_or_user_and_a_reload_switches_policy_in_place(
    fleets: list[FleetUp], tmp_path: Path
) -> None:
    fleet = start(fleets, tmp_path, chat={"model": "org/chat", "replicas": 2, "routing": "session"})
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none")
    pids = {u["name"]: u["pid"] for u in fleet.upstreams()}
    for session in ("alpha", "beta", "gamma", "delta"):
        headers = {"X-Session-Id": session}
        served = converse(client, "chat", 1, 4, extra_headers=headers)
        assert len(set(served)) == 1, (session, served)
        by_user = converse(client, "chat", 2, 4, user=session)
        assert len(set(by_user)) == 1, (session, by_user)
    spread = {converse(client, "chat", 3, 1, user=f"user-{i}")[0] for i in range(16)}
    assert spread == {"chat-0", "chat-1"}
    # A reload to round robin applies in the gateway: no engine restarts.
    data = yaml.safe_load(fleet.path.read_text())
    data["deployments"]["chat"]["routing"] = "round_robin"
    fleet.path.write_text(yaml.safe_dump(data))
    done = fleet_cli("reload", str(fleet.path), "--url", fleet.url, "--wait")
    assert "chat: routing session -> round_robin" in done.stdout, done.stdout + done.stderr
    served = converse(client, "chat", 1, 4, extra_headers={"X-Session-Id": "alpha"})
    assert served in (["chat-0", "chat-1"] * 2, ["chat-1", "chat-0"] * 2), served
    assert {u["name"]: u["pid"] for u in fleet.upstreams()} == pids
