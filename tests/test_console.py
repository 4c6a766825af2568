"""The status page's routes on a real `fleet up` with fake engines: the page and its files,
`GET /fleet/overview` (engines, their load, the gateway's measurements, GPUs, keys), the
restart action, and each engine's metrics through the gateway. (The page itself, in a
real browser: test_page_browser.py; Prometheus: test_prometheus_real.py.)"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import fake_fleet_file, wait_until
from tests.test_fleet_up import FleetUp
from tests.test_fleet_up import fleets as fleets  # the fixture
from vllm_fleet.testing.harness import engine_json, engine_request

ADMIN, TEAM = "sk-admin-0123456789", "sk-team-0123456789"
CHAT = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": true}'


def call(
    fleet: FleetUp,
    path: str,
    method: str = "GET",
    key: str | None = None,
    body: bytes = b"",
    extra: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request to the gateway: status, headers (lower-case names), body."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers |= extra or {}
    if body:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        fleet.url + path, data=body if method == "POST" else None, method=method, headers=headers
    )

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def overview(fleet: FleetUp, key: str | None = None) -> dict[str, Any]:
    status, _, body = call(fleet, "/fleet/overview", key=key)
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def deployment(data: dict[str, Any], dep_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(d for d in data["deployments"] if d["id"] == dep_id)
    return found


def test_the_page_is_served_to_anyone_and_its_data_only_to_an_admin(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"chat": {"model": "org/chat"}},
        keys=[{"name": "ops", "key": ADMIN, "admin": True}, {"name": "team", "key": TEAM}],
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(
        lambda: fleet.status_with_key(ADMIN).get("deployments", {}).get("chat", {}).get("ready"),
        what="chat ready",
    )
    status, headers, body = call(fleet, "/fleet/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b"assets/fleet.js" in body and b"assets/fleet.css" in body
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, _ = call(fleet, "/fleet")
    assert status == 308 and headers["location"] == "/fleet/"
    for asset, kind in (("fleet.js", "text/javascript"), ("fleet.css", "text/css")):
        status, headers, body = call(fleet, f"/fleet/assets/{asset}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
    for missing in ("nope.js", ".hidden.js", "index.html/x", "a%00.js", "x" * 4000 + ".js"):
        status, _, body = call(fleet, f"/fleet/assets/{missing}")
        assert status == 404, missing
        assert json.loads(body)["error"]["code"] == "not_found"
    # A path that leaves the folder is no file of the page (a request for a deployment).
    status, _, body = call(fleet, "/fleet/assets/..%2F..%2Fadmin.py")
    assert status == 401 and b"import" not in body
    assert call(fleet, "/fleet/", "POST", ADMIN, b"{}")[0] == 405

    status, _, body = call(fleet, "/fleet/overview")
    assert status == 401
    status, _, body = call(fleet, "/fleet/overview", key=TEAM)
    assert status == 403 and "admin" in json.loads(body)["error"]["message"]
    for _ in range(2):
        assert call(fleet, "/chat/v1/chat/completions", "POST", TEAM, CHAT.encode())[0] == 200
    data = overview(fleet, ADMIN)
    assert data["gateway"]["keys"] is True
    assert [d["id"] for d in data["deployments"]] == ["chat"]
    (team,) = data["keys"]  # by name, never the key
    assert team == {
        "name": "team", "requests": 2, "errors": 0, "prompt_tokens": team["prompt_tokens"],
        "completion_tokens": 12,
    }  # fmt: skip
    assert team["prompt_tokens"] > 0 and TEAM not in json.dumps(data)
    # Restarting needs an admin key too, and so do an engine's metrics (as /metrics does).
    assert call(fleet, "/fleet/engines/chat-0/restart", "POST", TEAM, b"{}")[0] == 403
    assert call(fleet, "/fleet/engines/chat-0/metrics", key=TEAM)[0] == 403
    assert call(fleet, "/fleet/targets")[0] == 401
    assert fleet.stop() == 0


def test_the_overview_shows_each_engine_its_load_and_what_the_gateway_measured(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {
            "chat": {"model": "org/chat", "replicas": 2},
            "code": {"model": "org/code", "listen": "tcp"},
            "lazy": {"model": "org/lazy", "start": "on_demand"},
        },
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: sum(u["state"] == "ready" for u in fleet.upstreams()) == 3, what="3 engines")
    status_ups = {u["name"]: u for u in fleet.upstreams()}
    for _ in range(12):
        status, _, body = call(fleet, "/chat/v1/chat/completions", "POST", body=CHAT.encode())
        assert status == 200 and b"[DONE]" in body
    assert call(fleet, "/nope/v1/chat/completions", "POST", body=CHAT.encode())[0] == 404
    whole = CHAT.replace('"stream": true', '"stream": false').encode()
    for _ in range(3):  # answered whole: counted, but there is no first token to time
        assert call(fleet, "/code/v1/chat/completions", "POST", body=whole)[0] == 200

    def settled() -> dict[str, Any] | None:
        # The engines' load is read every health interval: wait for a reading after the
        # requests (both replicas' generated tokens add up to what was asked).
        data = overview(fleet)
        ups = deployment(data, "chat")["upstreams"]
        done = (
            all(u["engine"] for u in ups)
            and sum(u["engine"]["generation_tokens"] for u in ups) == 12 * 6
        )
        return data if done else None

    data = wait_until(settled, what="the engines' load after the requests")
    assert data["gateway"]["node"] and data["fleet"]["generation"] == 1
    assert data["actions"] == {"reload": True, "restart": True, "load": True}
    chat = deployment(data, "chat")
    assert (chat["kind"], chat["state"], chat["ready"], chat["replicas"]) == (
        "engines", "loaded", 2, 2,
    )  # fmt: skip
    recent = chat["recent"]
    assert recent["requests"] == 12 and recent["errors"] == 0 and recent["in_flight"] == 0
    assert recent["rps"] > 0 and recent["tokens_per_s"] > 0
    assert 0 < recent["ttft_p50_ms"] <= recent["ttft_p95_ms"]
    assert sum(chat["series"]["rps"]) > 0 and any(chat["series"]["ttft_p50_ms"])
    assert chat["engine"] == {"running": 0.0, "waiting": 0.0, "kv_cache": 0.0}
    for up in chat["upstreams"]:
        assert up["state"] == "ready" and up["pid"] == status_ups[up["name"]]["pid"]
        assert up["socket"] and up["port"] is None and up["log_tail"] == []
        # The figures are the engine's own /metrics, read straight from the engine.
        _, page = engine_request(status_ups[up["name"]]["url"], "/metrics")
        own = {
            s.name: s.value
            for family in text_string_to_metric_families(page.decode())
            for s in family.samples
        }
        assert up["engine"]["generation_tokens"] == own["vllm:generation_tokens_total"]
        assert up["engine"]["running"] == own["vllm:num_requests_running"]
    code_recent = deployment(data, "code")["recent"]
    assert code_recent["requests"] == 3 and code_recent["ttft_p50_ms"] is None
    assert code_recent["tokens_per_s"] > 0
    code = deployment(data, "code")["upstreams"][0]
    assert code["port"] == status_ups["code-0"]["port"] and code["socket"] is None
    lazy = deployment(data, "lazy")
    assert (lazy["start"], lazy["state"], lazy["engine"]) == ("on_demand", "unloaded", None)
    assert data["gpus"]["available"] is False and "nvidia-smi" in data["gpus"]["reason"]
    assert data["keys"] == []

    # Each engine's metrics through the gateway: the socket's, and the port's.
    for name in ("chat-0", "code-0"):
        status, headers, page = call(fleet, f"/fleet/engines/{name}/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert b"vllm:num_requests_running" in page
    status, _, body = call(fleet, "/fleet/engines/lazy-0/metrics")  # not running
    assert status == 502 and "lazy-0" in json.loads(body)["error"]["message"]
    assert call(fleet, "/fleet/engines/nope-0/metrics")[0] == 404
    assert fleet.stop() == 0


def test_restart_gives_the_engine_a_new_process_and_says_what_it_cannot_restart(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {"chat": {"model": "org/chat"}, "lazy": {"model": "org/lazy", "start": "on_demand"}},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: any(u["state"] == "ready" for u in fleet.upstreams()), what="chat-0")
    before = next(u for u in fleet.upstreams() if u["name"] == "chat-0")
    # Without keys: from this machine only, not through a proxy nor from another site's page.
    for header, why in (
        ({"X-Forwarded-For": "10.0.0.7"}, "came through a proxy"),
        ({"Origin": "http://evil.example"}, "a page of another site"),
        ({"Sec-Fetch-Site": "cross-site"}, "a page of another site"),
    ):
        status, _, body = call(
            fleet, "/fleet/engines/chat-0/restart", "POST", body=b"{}", extra=header
        )
        assert status == 403 and why in json.loads(body)["error"]["message"], body
    same_site = {"Origin": fleet.url, "Sec-Fetch-Site": "same-origin"}
    status, _, body = call(
        fleet, "/fleet/engines/chat-0/restart", "POST", body=b"{}", extra=same_site
    )
    assert status == 202, body
    answer = json.loads(body)
    assert answer["result"] == "restarting" and answer["engine"] == "chat-0"
    # A second ask while the first is under way is refused: one restart at a time.
    status, _, body = call(fleet, "/fleet/engines/chat-0/restart", "POST", body=b"{}")
    assert status == 409 and "stopping already" in json.loads(body)["error"]["message"]

    def restarted() -> dict[str, Any] | None:
        up = next(u for u in fleet.upstreams() if u["name"] == "chat-0")
        return up if up["state"] == "ready" and up["pid"] != before["pid"] else None

    after = wait_until(restarted, what="chat-0 ready with a new pid")
    assert after["restarts"] == before["restarts"] + 1
    assert not os.path.exists(f"/proc/{before['pid']}/status") or (
        "zombie" in Path(f"/proc/{before['pid']}/status").read_text()
    )
    _, _, metrics = call(fleet, "/metrics")
    assert b'fleet_engine_starts_total{deployment="chat",reason="restart"} 1.0' in metrics

    status, _, body = call(fleet, "/fleet/engines/lazy-0/restart", "POST", body=b"{}")
    assert status == 409 and "load `lazy` instead" in json.loads(body)["error"]["message"]
    status, _, body = call(fleet, "/fleet/engines/nope/restart", "POST", body=b"{}")
    assert status == 404 and "chat-0" in json.loads(body)["error"]["message"]
    status, headers, _ = call(fleet, "/fleet/engines/chat-0/restart")
    assert status == 405 and headers["allow"] == "POST"
    assert fleet.stop() == 0


def test_a_crashed_engine_shows_its_backoff_and_a_failed_one_the_tail_of_its_log(
    tmp_path: Path, fleets: list[FleetUp]
) -> None:
    path = fake_fleet_file(
        tmp_path,
        {
            "chat": {"model": "org/chat"},
            "gated": {"model": "org/gated", "args": ["--fail-start"]},
        },
        engines={"backoff_initial": 3, "backoff_max": 3, "max_restarts": 1},
    )
    fleet = FleetUp(path)
    fleets.append(fleet)
    chat = wait_until(
        lambda: next((u for u in fleet.upstreams() if u["state"] == "ready"), None), what="chat"
    )
    os.kill(chat["pid"], signal.SIGKILL)

    def restarting() -> dict[str, Any] | None:
        up = deployment(overview(fleet), "chat")["upstreams"][0]
        return up if up["retry_at"] is not None else None

    up = wait_until(restarting, what="chat-0 waiting out its backoff")
    assert up["state"] == "starting" and "restarting in 3s" in up["message"]
    now = time.time()
    assert now - 1 < up["retry_at"] <= now + 3
    assert up["log_tail"] and "fake_vllm" in up["log_tail"][-1]  # its last line

    def failed() -> dict[str, Any] | None:
        up = deployment(overview(fleet), "gated")["upstreams"][0]
        return up if up["state"] == "failed" else None

    gated = wait_until(failed, timeout=30, what="gated-0 failed")
    assert any("gated repo" in line for line in gated["log_tail"])
    assert "gave up after" in gated["message"]
    assert deployment(overview(fleet), "gated")["state"] == "failed"
    # A failed engine is started again by a restart (and here fails again, as it must).
    status, _, body = call(fleet, "/fleet/engines/gated-0/restart", "POST", body=b"{}")
    assert status == 202, body
    again = wait_until(
        lambda: (u := failed()) and u["since"] > gated["since"] and u,
        timeout=30,
        what="gated-0 started again and failed again",
    )
    assert again["restarts"] > gated["restarts"]
    assert fleet.stop() == 0


def fake_nvidia_smi(directory: Path) -> Path:
    """nvidia-smi for two H200s: the inventory query (the plan's) and the use query (the
    page's), answered from real H200 output (tests/fixtures/nvidia-smi-h200), the second
    board busy."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        "  *memory.free*) printf '"
        "0, GPU-f81e7441-b981-575f-05ad-1c042c2ac28f, NVIDIA H200, 143771, 0, 143156\\n"
        "1, GPU-f81e7441-b981-575f-05ad-1c042c2ac290, NVIDIA H200, 143771, 0, 143156\\n' ;;\n"
        "  *) printf '0, NVIDIA H200, 0, 143771, 0\\n1, NVIDIA H200, 120034, 143771, 87\\n' ;;\n"
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_the_gpus_are_shown_with_the_engines_that_hold_them(
    tmp_path: Path, fleets: list[FleetUp], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = fake_fleet_file(tmp_path, {"big": {"model": "org/big", "gpus": [1]}})
    fleet = FleetUp(path)
    fleets.append(fleet)
    wait_until(lambda: any(u["state"] == "ready" for u in fleet.upstreams()), what="big-0")
    gpus = overview(fleet)["gpus"]
    assert gpus["available"] is True
    assert gpus["devices"] == [
        {
            "index": 0, "name": "NVIDIA H200", "memory_used_mib": 0,
            "memory_total_mib": 143771, "utilization_pct": 0, "engines": [],
        },
        {
            "index": 1, "name": "NVIDIA H200", "memory_used_mib": 120034,
            "memory_total_mib": 143771, "utilization_pct": 87, "engines": ["big-0"],
        },
    ]  # fmt: skip
    env = engine_json(fleet.upstreams()[0]["url"], "/fake/env")
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert fleet.stop() == 0
