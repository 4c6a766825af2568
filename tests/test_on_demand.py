"""On-demand deployments with real processes: `fleet up` on fake engines with vLLM's
sleep mode, requests queued while an engine loads, swap groups that never hold two
members at once (the fake engines' GPU ledger says so), idle unload, the queue's 503s,
loading and unloading by hand, and the dev-mode routes refused."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import fake_fleet_file, pid_alive, wait_until
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture
from tests.test_reload import Stream, tokens_in
from vllm_fleet.engines.demand import RETRY_FAILED_LOAD
from vllm_fleet.testing.fake_sleep import overlaps, read_ledger

ALTERNATE_SECONDS = 60.0  # the minute of clients alternating between two members


def call(
    url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120
) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        f"{url}{path}",
        data=data if body is not None or path.startswith("/fleet/deployments") else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None or path.startswith("/fleet/deployments") else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.load(resp), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw or b"{}"), dict(exc.headers)


def chat(url: str, dep: str, tokens: int = 2) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    return call(url, f"/{dep}/v1/chat/completions", body)


def states(fleet: FleetUp) -> dict[str, str]:
    _, data, _ = call(fleet.url, "/v1/models", timeout=5)
    return {m["id"]: m["state"] for m in data["data"]}


def wait_state(fleet: FleetUp, dep: str, state: str, timeout: float = 30) -> None:
    def reached() -> bool:
        assert fleet.proc.poll() is None, fleet.text()
        try:
            return states(fleet).get(dep) == state
        except OSError:
            return False

    wait_until(reached, timeout=timeout, what=f"{dep} {state}")


def on_demand(fleet: FleetUp) -> dict[str, Any]:
    data = fleet.status()
    assert data is not None
    found: dict[str, Any] = data["on_demand"]
    return found


def metric(fleet: FleetUp, name: str) -> list[tuple[str, float]]:
    with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = []
    for line in text.splitlines():
        if line.startswith(name):
            labels, _, value = line.rpartition(" ")
            out.append((labels, float(value)))
    return out


def start(fleets: list[FleetUp], tmp_path: Path, deployments: dict[str, dict[str, Any]]) -> FleetUp:
    fleet = FleetUp(fake_fleet_file(tmp_path, deployments))
    fleets.append(fleet)
    wait_until(lambda: fleet.status() is not None, timeout=20, what="the gateway")
    return fleet


def member(ledger: Path, swap_group: str = "pair", **kw: Any) -> dict[str, Any]:
    """A fake engine in a swap group, with the GPU ledger its memory is written to."""
    return {
        "start": "on_demand",
        "swap_group": swap_group,
        "env": {"FAKE_VLLM_GPU_LEDGER": str(ledger)},
        **kw,
    }


def test_two_members_used_in_turn_never_hold_the_gpus_together(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    ledger = tmp_path / "gpu.ledger"
    slow_start = ["--startup-delay", "0.5", "--token-delay", "0.01"]
    fleet = start(
        fleets,
        tmp_path,
        {
            # One wakes from sleep mode, the other starts cold each time.
            "left": member(
                ledger, sleep=1, min_hold=2, queue_timeout=60, model="org/left",
                args=[*slow_start, "--fake-wake-delay", "0.2"],
            ),
            "right": member(ledger, min_hold=2, queue_timeout=60, model="org/right",
                            args=slow_start),
            "always": {"model": "org/always", "args": ["--token-delay", "0.01"]},
        },
    )  # fmt: skip
    wait_state(fleet, "always", "loaded")
    assert states(fleet) == {"left": "unloaded", "right": "unloaded", "always": "loaded"}

    def timed_chat(dep: str) -> tuple[int, float]:
        began = time.monotonic()
        status, body, _ = chat(fleet.url, dep)
        if status == 200:
            assert body["model"] == f"org/{dep}", body  # answered by the right engine
        return status, time.monotonic() - began

    baseline = [timed_chat("always")[1] for _ in range(50)]
    results: dict[str, list[tuple[int, float]]] = {"left": [], "right": [], "always": []}
    lock = threading.Lock()
    deadline = time.monotonic() + ALTERNATE_SECONDS

    def client(dep: str) -> None:
        while time.monotonic() < deadline:
            outcome = timed_chat(dep)
            with lock:
                results[dep].append(outcome)

    threads = [
        threading.Thread(target=client, args=(dep,), daemon=True)
        for dep in ("left", "right")
        for _ in range(8)
    ]
    threads.append(threading.Thread(target=client, args=("always",), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ALTERNATE_SECONDS + 120)

    failed = {d: [s for s, _ in r if s != 200] for d, r in results.items()}
    assert failed == {"left": [], "right": [], "always": []}, failed
    assert len(results["left"]) > 16 and len(results["right"]) > 16
    entries = read_ledger(ledger)
    assert entries, "the fake engines wrote no GPU ledger"
    assert overlaps(entries) == []
    group = on_demand(fleet)["groups"]["pair"]
    kinds = dict((labels, value) for labels, value in metric(fleet, "fleet_swaps_total"))
    wakes = sum(v for k, v in kinds.items() if 'kind="wake"' in k)
    colds = sum(v for k, v in kinds.items() if 'kind="cold_start"' in k)
    assert group["swaps"] >= 4, group  # they really took turns
    assert wakes >= 1 and colds >= 2, kinds
    # The deployment outside the group never waited in a queue.
    assert not [k for k, _ in metric(fleet, "fleet_queue_wait_seconds_count") if "always" in k]
    buckets: dict[str, float] = {}
    for labels, value in metric(fleet, "fleet_queue_wait_seconds_bucket"):
        le = labels.split('le="', 1)[1].split('"', 1)[0]
        buckets[le] = buckets.get(le, 0.0) + value
    queued = buckets.pop("+Inf")
    assert queued > 0  # requests really waited for their member

    def wait_quantile(q: float) -> float:  # as Prometheus' histogram_quantile() does
        lower, below = 0.0, 0.0
        for le, count in sorted(buckets.items(), key=lambda b: float(b[0])):
            if count >= q * queued:
                share = (q * queued - below) / (count - below) if count > below else 1.0
                return round(lower + (float(le) - lower) * share, 2)
            lower, below = float(le), count
        return lower

    waits = sorted(t for d in ("left", "right") for _, t in results[d])
    always = sorted(t for _, t in results["always"])
    report = {
        "requests": {d: len(r) for d, r in results.items()},
        "swaps": group["swaps"],
        "wakes": wakes,
        "cold_starts": colds,
        "queued_requests": int(queued),
        "queue_wait_p50_s": wait_quantile(0.5),
        "queue_wait_p99_s": wait_quantile(0.99),
        "member_latency_p50_s": round(statistics.median(waits), 3),
        "member_latency_p99_s": round(waits[int(len(waits) * 0.99) - 1], 3),
        "outside_p50_s": round(statistics.median(always), 4),
        "outside_baseline_p50_s": round(statistics.median(baseline), 4),
    }
    (tmp_path / "swap-report.json").write_text(json.dumps(report))
    print("swap group under alternating load:", json.dumps(report))


def test_idle_engine_is_unloaded_and_loads_again_when_asked_for(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    fleet = start(
        fleets, tmp_path, {"lazy": {"model": "org/lazy", "start": "on_demand", "idle_timeout": 1}}
    )
    assert states(fleet) == {"lazy": "unloaded"}
    assert fleet.upstreams()[0]["pid"] is None  # nothing runs before it is asked for
    # A monitor's GET neither loads it nor counts as a use; the fleet counts as ready.
    status, body, _ = call(fleet.url, "/lazy/health")
    assert status == 503 and body["error"]["code"] == "deployment_not_loaded", body
    status, body, _ = call(fleet.url, "/health?ready=1")
    assert status == 200 and body["deployments"]["lazy"]["state"] == "unloaded", body
    assert states(fleet) == {"lazy": "unloaded"}
    status, body, _ = chat(fleet.url, "lazy")
    assert status == 200 and body["model"] == "org/lazy"
    pid = fleet.upstreams()[0]["pid"]
    assert pid is not None and pid_alive(pid)
    wait_state(fleet, "lazy", "unloaded", timeout=15)
    wait_until(lambda: not pid_alive(pid), timeout=10, what="the idle engine gone")
    status, _, _ = chat(fleet.url, "lazy")
    assert status == 200
    assert fleet.upstreams()[0]["pid"] not in (None, pid)


def test_a_full_queue_and_a_queue_timeout_answer_503_with_retry_after(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    fleet = start(
        fleets,
        tmp_path,
        {
            "slow": {
                "model": "org/slow", "start": "on_demand", "max_queued": 2,
                "args": ["--startup-delay", "3"],
            },
            "slower": {
                "model": "org/slower", "start": "on_demand", "queue_timeout": 0.5,
                "args": ["--startup-delay", "5"],
            },
        },
    )  # fmt: skip
    answers: list[tuple[int, dict[str, Any], dict[str, str]]] = []

    def ask() -> None:
        answers.append(chat(fleet.url, "slow"))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: on_demand(fleet)["deployments"]["slow"]["queued"] == 2, what="2 queued")
    status, body, headers = chat(fleet.url, "slow")  # the third: over max_queued
    assert status == 503, body
    assert body["error"]["code"] == "queue_full"
    assert "max_queued: 2" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    for thread in threads:
        thread.join(30)
    assert sorted(a[0] for a in answers) == [200, 200]  # the two that waited were served
    status, body, headers = chat(fleet.url, "slower")
    assert status == 503 and body["error"]["code"] == "queue_timeout", body
    assert "queue_timeout" in body["error"]["message"] and "loading" in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    refused = dict(metric(fleet, "fleet_queue_refused_total"))
    assert refused['fleet_queue_refused_total{deployment="slow",reason="full"}'] == 1
    assert refused['fleet_queue_refused_total{deployment="slower",reason="timeout"}'] == 1


def test_a_stream_waits_for_its_engine_and_gets_every_token(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    fleet = start(
        fleets,
        tmp_path,
        {"lazy": {"model": "org/lazy", "start": "on_demand", "args": ["--startup-delay", "1"]}},
    )
    stream = Stream(fleet.url, "lazy", 20)  # its head comes only once the engine answers
    answer = stream.result()
    assert tokens_in(answer) == 20 and answer.rstrip().endswith(b"0")
    assert states(fleet)["lazy"] == "loaded"


def test_load_and_unload_by_hand_and_the_models_list_says_each_state(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    ledger = tmp_path / "gpu.ledger"
    fleet = start(
        fleets,
        tmp_path,
        {
            "one": member(ledger, sleep=1, model="org/one"),
            "two": member(ledger, sleep=2, model="org/two"),
            "always": {"model": "org/always"},
        },
    )
    wait_state(fleet, "always", "loaded")
    status, body, _ = call(fleet.url, "/fleet/deployments/one/load")
    assert (status, body["state"]) == (200, "loaded"), body
    assert states(fleet) == {"one": "loaded", "two": "unloaded", "always": "loaded"}
    status, body, _ = call(fleet.url, "/fleet/deployments/two/load")  # a swap: one sleeps
    assert (status, body["state"]) == (200, "loaded"), body
    assert states(fleet) == {"one": "sleeping", "two": "loaded", "always": "loaded"}
    group = on_demand(fleet)["groups"]["pair"]
    assert group["holder"] == "two" and group["last_swap"]["from"] == ["one"]
    status, body, _ = call(fleet.url, "/fleet/deployments/one/load")  # woken
    assert (status, body["state"]) == (200, "loaded"), body
    assert on_demand(fleet)["groups"]["pair"]["last_swap"]["kind"] == "wake"
    assert states(fleet)["two"] == "sleeping"  # at level 2
    status, body, _ = call(fleet.url, "/fleet/deployments/two/load")  # woken, weights reloaded
    assert (status, body["state"]) == (200, "loaded"), body
    assert on_demand(fleet)["groups"]["pair"]["last_swap"]["kind"] == "wake"
    assert chat(fleet.url, "two")[1]["model"] == "org/two"
    status, body, _ = call(fleet.url, "/fleet/deployments/one/unload")  # asleep: stopped
    assert (status, body["state"]) == (200, "unloaded"), body
    assert states(fleet)["one"] == "unloaded"
    status, body, _ = call(fleet.url, "/fleet/deployments/always/unload")
    assert status == 409 and body["error"]["code"] == "not_on_demand"
    status, body, _ = call(fleet.url, "/fleet/deployments/nope/load")
    assert status == 404
    assert overlaps(read_ledger(ledger)) == []


def test_dev_mode_routes_are_refused_on_the_path_routes(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    fleet = start(
        fleets,
        tmp_path,
        {"dev": {"model": "org/dev", "sleep": 1, "start": "on_demand"}},
    )
    call(fleet.url, "/fleet/deployments/dev/load")
    for method, path in (
        ("POST", "/dev/sleep?level=1"),
        ("POST", "/dev/wake_up"),
        ("GET", "/dev/is_sleeping"),
        ("POST", "/dev/collective_rpc"),
        ("POST", "/dev//sleep"),
        ("POST", "/dev/%73leep"),
        ("POST", "/dev/reset_prefix_cache/"),
    ):
        request = urllib.request.Request(f"{fleet.url}{path}", data=b"{}", method=method)
        if method == "GET":
            request = urllib.request.Request(f"{fleet.url}{path}")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                raise AssertionError(f"{path} answered {resp.status}")
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
            assert exc.code == 403 and body["error"]["code"] == "route_not_allowed", (path, body)
    assert states(fleet)["dev"] == "loaded"  # and nothing put it to sleep


def test_a_reload_adds_an_on_demand_deployment_unloaded_and_replaces_a_loaded_one(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path, {"kept": {"model": "org/kept", "start": "on_demand", "swap_group": "g"}}
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: fleet.status() is not None, timeout=20, what="the gateway")
    assert chat(fleet.url, "kept")[0] == 200
    old_pid = fleet.upstreams()[0]["pid"]
    data = yaml.safe_load(path.read_text())
    data["deployments"]["kept"]["args"] = ["--max-model-len", "1024"]  # a new engine
    data["deployments"]["added"] = {"model": "org/added", "start": "on_demand", "swap_group": "g"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    status, body, _ = call(fleet.url, "/fleet/reload", {})
    assert status == 202, body

    def applied() -> bool:
        record = (fleet.status() or {}).get("fleet", {}).get("reload") or {}
        return record.get("result") == "applied"

    wait_until(applied, timeout=30, what="the reload applied")
    assert states(fleet) == {"kept": "unloaded", "added": "unloaded"}
    wait_until(lambda: not pid_alive(old_pid), timeout=10, what="the old engine gone")
    assert on_demand(fleet)["groups"]["g"]["members"] == ["kept", "added"]
    status, body, _ = chat(fleet.url, "added")
    assert status == 200 and body["model"] == "org/added"
    status, body, _ = chat(fleet.url, "kept")  # the new engine, loaded by its request
    assert status == 200 and body["model"] == "org/kept"
    assert states(fleet) == {"kept": "loaded", "added": "unloaded"}


def test_a_load_that_fails_answers_its_queue_at_once_and_is_not_retried_for_a_while(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    fleet = start(
        fleets,
        tmp_path,
        {
            "good": {"model": "org/good", "start": "on_demand", "swap_group": "g"},
            "bad": {
                "model": "org/bad", "start": "on_demand", "swap_group": "g",
                "args": ["--fail-start"],
            },
        },
    )  # fmt: skip
    assert chat(fleet.url, "good")[0] == 200
    status, body, headers = chat(fleet.url, "bad")  # tried once: no restarts with backoff
    assert status == 503, body
    assert "its load failed" in body["error"]["message"], body
    assert "exited with status" in body["error"]["message"], body
    assert int(headers["Retry-After"]) == RETRY_FAILED_LOAD  # the whole wait before a retry
    status, body, headers = chat(fleet.url, "bad")  # not tried again yet
    assert status == 503 and body["error"]["code"] == "deployment_failed", body
    # What is left of that wait: asked moments later, more than half of it.
    assert RETRY_FAILED_LOAD / 2 < int(headers["Retry-After"]) <= RETRY_FAILED_LOAD
    status, body, _ = chat(fleet.url, "good")  # loaded again, not evicted again by `bad`
    assert status == 200 and body["model"] == "org/good"
    assert states(fleet) == {"good": "loaded", "bad": "failed"}


def test_requests_waiting_for_a_deployment_a_reload_removes_get_their_503(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {
            "stays": {"model": "org/stays"},
            "goes": {"model": "org/goes", "start": "on_demand", "args": ["--startup-delay", "8"]},
        },
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_state(fleet, "stays", "loaded")
    answers: list[tuple[int, dict[str, Any], dict[str, str]]] = []
    waiting = threading.Thread(target=lambda: answers.append(chat(fleet.url, "goes")))
    waiting.start()
    wait_until(lambda: on_demand(fleet)["deployments"]["goes"]["queued"] == 1, what="queued")
    data = yaml.safe_load(path.read_text())
    del data["deployments"]["goes"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert call(fleet.url, "/fleet/reload", {})[0] == 202
    waiting.join(10)
    assert not waiting.is_alive(), "the waiting request was never answered"
    status, body, _ = answers[0]
    assert status == 503 and "removed from the fleet file" in body["error"]["message"], body


def test_fleet_load_and_unload_commands(tmp_path: Path, fleets: list[FleetUp]) -> None:
    fleet = start(fleets, tmp_path, {"lazy": {"model": "org/lazy", "start": "on_demand"}})

    def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vllm_fleet.cli", *args, "--url", fleet.url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    done = fleet_cli("load", "lazy")
    assert done.returncode == 0 and "lazy: loaded (took" in done.stdout, done
    assert states(fleet) == {"lazy": "loaded"}
    done = fleet_cli("unload", "lazy")
    assert done.returncode == 0 and "lazy: unloaded" in done.stdout, done
    assert states(fleet) == {"lazy": "unloaded"}
    done = fleet_cli("load", "nope")
    assert done.returncode == 1 and "no deployment `nope`" in done.stderr, done


def test_real_clients_on_every_route_style_wait_for_their_engines(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    """The openai SDK (OpenAI and AzureOpenAI, streamed and not) through all three route
    styles to on-demand deployments, one with two replicas (both load and unload
    together); a key that may not use a deployment gets its 403 and loads nothing."""
    path = fake_fleet_file(
        tmp_path,
        {
            "pair": {
                "model": "org/pair", "start": "on_demand", "swap_group": "g", "replicas": 2,
                "args": ["--startup-delay", "0.5"],
            },
            "solo": {"model": "org/solo", "start": "on_demand", "swap_group": "g"},
        },
        keys=[
            {"name": "ops", "key": "ops-key", "admin": True},
            {"name": "pair-only", "key": "pair-key", "deployments": ["pair"]},
        ],
    )  # fmt: skip
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: fleet.status_with_key("ops-key"), timeout=20, what="the gateway")
    messages: Any = [{"role": "user", "content": "hi"}]
    by_path = openai.OpenAI(base_url=f"{fleet.url}/pair/v1", api_key="pair-key")
    reply = by_path.chat.completions.create(model="x", messages=messages, max_tokens=3)
    assert reply.model == "org/pair"
    ups = fleet.status_with_key("ops-key")["deployments"]["pair"]["upstreams"]
    assert [u["state"] for u in ups] == ["ready", "ready"]  # both replicas loaded
    denied = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="pair-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        denied.chat.completions.create(model="solo", messages=messages, max_tokens=3)
    solo = fleet.status_with_key("ops-key")["deployments"]["solo"]["upstreams"][0]
    assert solo["state"] == "unloaded"  # the refused request loaded nothing
    azure = openai.AzureOpenAI(
        azure_endpoint=fleet.url, azure_deployment="solo", api_version="2024-10-21",
        api_key="ops-key",
    )  # fmt: skip
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in azure.chat.completions.create(
            model="x", messages=messages, max_tokens=4, stream=True
        )
        if chunk.choices
    )
    assert text.split() == ["tok0", "tok1", "tok2", "tok3"]
    status = fleet.status_with_key("ops-key")
    assert [u["state"] for u in status["deployments"]["pair"]["upstreams"]] == [
        "unloaded",
        "unloaded",
    ]  # both replicas made room
    by_model = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="ops-key")
    reply = by_model.completions.create(model="pair", prompt="hi", max_tokens=2)
    assert reply.model == "org/pair"
    assert status["on_demand"]["groups"]["g"]["swaps"] >= 2
