"""What a routing policy costs a request, in process: the gateway's routing step
(`Core.route`: parse, hint, rewrite) and its replica pick (`Core.pick`), timed for the
default `least_outstanding` against `prefix`, `session` and `round_robin`, on chat
bodies from one short turn to a long conversation. No server, no engine: this is the
CPU a policy adds to every request, which `make bench`'s end-to-end runs cannot resolve
(their bodies are a few dozen bytes). Run by `make bench` (a table in
bench/results/latest.md), or alone: `python -m bench.policy_cost`.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

from vllm_fleet.config import loads
from vllm_fleet.gateway.core import Core, Forward
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry, State

POLICIES = ("least_outstanding", "round_robin", "session", "prefix")
ROUNDS = 5


def fleet_text() -> str:
    lines = ["deployments:"]
    for i, policy in enumerate(POLICIES):
        ports = f"[http://127.0.0.1:{9100 + 2 * i}, http://127.0.0.1:{9101 + 2 * i}]"
        lines.append(
            f"  {policy.replace('_', '-')}: {{model: org/m, endpoints: {ports}, routing: {policy}}}"
        )
    return "\n".join(lines) + "\n"


def chat_body(turns: int, system_words: int, seed: int) -> bytes:
    rng = random.Random(seed)
    vocab = ("route", "cache", "token", "prefix", "engine", "replica", "batch", "model")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": " ".join(rng.choice(vocab) for _ in range(system_words))}
    ]
    for turn in range(turns):
        question = " ".join(rng.choice(vocab) for _ in range(30))
        messages.append({"role": "user", "content": f"question {turn}: {question}"})
        messages.append(
            {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(60))}
        )
    messages.append({"role": "user", "content": "and next?"})
    return json.dumps({"model": "m", "messages": messages, "max_tokens": 16, "user": "u1"}).encode()


BODIES = {
    "1 short turn": chat_body(0, 8, 1),
    "6 turns, 300-word system prompt": chat_body(6, 300, 2),
    "20 turns, 1,000-word system prompt": chat_body(20, 1000, 3),
}


def measure(iterations: int = 4000) -> dict[str, dict[str, float]]:
    """Microseconds per request (routing step + pick), per body and policy: the median of
    ROUNDS rounds of `iterations` requests."""
    config = loads(fleet_text())
    registry = Registry(config, build_plan(config, Inventory(None, "none"), "python"))
    for up in registry.all():
        up.set_state(State.READY)
    core = Core(config, registry)
    lines = [b"X-Session-Id", b": ", b"s1", b"\r\n"]
    out: dict[str, dict[str, float]] = {}
    for label, body in BODIES.items():
        out[label] = {"bytes": float(len(body))}
        for policy in POLICIES:
            path = f"/{policy.replace('_', '-')}/v1/chat/completions"
            rounds = []
            for _ in range(ROUNDS):
                began = time.perf_counter()
                for _ in range(iterations):
                    forward = core.route("POST", path, "", "application/json", body, lines=lines)
                    assert isinstance(forward, Forward)
                    core.pick(forward.deployment, set(), forward.hint)
                rounds.append((time.perf_counter() - began) / iterations * 1e6)
            out[label][policy] = statistics.median(rounds)
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    head = "| body | bytes | " + " | ".join(POLICIES) + " | prefix − least_outstanding |"
    rows = [head, "|---|---:|" + "---:|" * (len(POLICIES) + 1)]
    for label, row in results.items():
        cells = " | ".join(f"{row[p]:.1f}" for p in POLICIES)
        added = row["prefix"] - row["least_outstanding"]
        rows.append(f"| {label} | {row['bytes']:,.0f} | {cells} | {added:+.1f} |")
    return "\n".join(rows)


def section(results: dict[str, dict[str, float]]) -> list[str]:
    return [
        "## Routing policies: CPU per request, in process (issue 16)",
        "",
        "Microseconds per request for the gateway's routing step (parse the body, read the "
        "policy's hint, rewrite `model`) and the replica pick, on one core, median of "
        f"{ROUNDS} rounds (`bench/policy_cost.py`); two ready replicas per deployment.",
        "",
        table(results),
        "",
    ]


if __name__ == "__main__":
    print(table(measure()))
