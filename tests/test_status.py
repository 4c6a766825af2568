"""`fleet status` rendering and its errors (the live path is in test_fleet_up.py)."""

from __future__ import annotations

import copy

import pytest
from rich.console import Console

from tests.conftest import free_port
from vllm_fleet.status import StatusError, fetch_status, render_status

SNAPSHOT = {
    "deployments": {
        "qwen": {
            "model": "Qwen/Qwen2.5-1.5B-Instruct",
            "aliases": [],
            "ready": 1,
            "replicas": 2,
            "upstreams": [
                {
                    "name": "qwen-0",
                    "state": "ready",
                    "since": 1000.0,
                    "pid": 4242,
                    "port": 8100,
                    "gpus": [0, 1],
                    "restarts": 2,
                    "outstanding": 3,
                    "message": "ready after 40.0s",
                    "log": "/logs/qwen-0.log",
                    "managed": True,
                },
                {
                    "name": "qwen-1",
                    "state": "failed",
                    "since": 1000.0,
                    "pid": None,
                    "port": 8101,
                    "gpus": [2, 3],
                    "restarts": 5,
                    "outstanding": 0,
                    "message": "exited with status 1; gave up after 6 failure(s) in a row",
                    "log": "/logs/qwen-1.log",
                    "managed": True,
                },
            ],
        },
        "remote": {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "ready": 1,
            "replicas": 1,
            "upstreams": [
                {
                    "name": "remote-0",
                    "state": "ready",
                    "url": "http://10.1.2.3:8000",
                    "managed": False,
                    "pid": None,
                    "restarts": 0,
                    "outstanding": 0,
                    "message": "",
                    "since": 1000.0,
                }
            ],
        },
    }
}


def render(data: dict) -> str:  # type: ignore[type-arg]
    console = Console(width=120, record=True, color_system=None)
    console.print(render_status(data, now=1090.0))
    return console.export_text()


def test_status_table_shows_each_engine_and_why_one_failed() -> None:
    text = render(SNAPSHOT)
    row = next(line for line in text.splitlines() if "qwen-0" in line)
    for cell in ("qwen 1/2", "ready", "90s", "4242", "8100", "0,1", "2", "3"):
        assert cell in row
    assert "qwen-1: exited with status 1; gave up after 6" in text
    assert "log: /logs/qwen-1.log" in text
    assert "/logs/qwen-0.log" not in text  # a ready engine needs no log pointer
    assert "remote-0: ready (remote http://10.1.2.3:8000)" in text


def test_status_table_shows_an_engine_the_gateway_ejected_and_why() -> None:
    data = copy.deepcopy(SNAPSHOT)
    up = data["deployments"]["qwen"]["upstreams"][0]
    up["ejected"] = "ConnectionResetError: the engine reset the connection"
    text = render(data)
    row = next(line for line in text.splitlines() if "qwen-0" in line)
    assert "ready, ejected" in row
    assert "qwen-0: out of the rotation until a health check passes: ConnectionReset" in text


def test_status_without_a_gateway_says_what_to_check() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StatusError, match="is `fleet up` running there"):
        fetch_status(url, timeout=2)


def test_status_says_why_a_ready_engine_was_restarted_and_shows_a_stalled_one() -> None:
    data = copy.deepcopy(SNAPSHOT)
    qwen0, qwen1 = data["deployments"]["qwen"]["upstreams"]
    qwen0.update(last_failure="stalled: 2 request(s) running", last_failure_at=790.0, stalls=1)
    reason = "stalled: 1 request(s) running and 0 waiting, but no token computed for 121s"
    qwen1.update(state="stalled", message=reason, pid=4343)
    text = render(data)
    assert "qwen-0: ready; last restarted after: stalled: 2 request(s) running (5m ago)" in text
    row = next(line for line in text.splitlines() if "qwen-1" in line)
    assert "stalled" in row and "4343" in row
    assert f"qwen-1: {reason}" in text
    assert "log: /logs/qwen-1.log" in text


def test_status_shows_the_fleet_file_generation_and_the_last_reload_with_its_failures() -> None:
    data = {
        **SNAPSHOT,
        "fleet": {
            "file": "/srv/fleet.yaml",
            "generation": 3,
            "hash": "0123456789ab",
            "reload": {
                "result": "failed",
                "generation": 3,
                "took_s": 41.5,
                "via": "SIGHUP",
                "at": 1030.0,
                "failures": ["chat-0: its replacement did not start (exited with status 1)"],
            },
        },
        "retiring": [{"name": "chat-1", "state": "ready", "pid": 77, "outstanding": 2}],
    }
    text = render(data)
    assert "fleet file /srv/fleet.yaml  generation 3 (sha256 0123456789ab)" in text
    assert "last reload: failed, generation 3, took 41.5s (SIGHUP, 60s ago)" in text
    assert "✗ chat-0: its replacement did not start (exited with status 1)" in text
    assert "chat-1 (retiring): out of routing, draining, then stopped; ready, pid 77, 2" in text


def test_status_shows_swap_groups_their_holder_queue_and_last_swap() -> None:
    data = copy.deepcopy(SNAPSHOT)
    data["on_demand"] = {
        "deployments": {
            "left": {"state": "loaded", "queued": 0, "idle_s": 1.0, "idle_timeout": None},
            "right": {
                "state": "sleeping", "queued": 3, "oldest_wait_s": 1.5, "idle_s": 40.0,
                "idle_timeout": 300.0, "last_load_s": 0.4, "note": "could not sleep: x",
            },
        },
        "groups": {
            "pair": {
                "members": ["left", "right"], "gpus": [0], "holder": "left", "queued": 3,
                "swaps": 7,
                "last_swap": {"from": ["right"], "to": "left", "kind": "wake",
                              "seconds": 0.4, "at": 1080.0},
            }
        },
    }  # fmt: skip
    text = render(data)
    assert "swap group pair (GPUs 0): left, right; holder left; 3 queued; 7 swap(s)" in text
    assert "last: right -> left (wake, 0.4s, 10s ago)" in text
    assert "right: sleeping, 3 queued (oldest 1.5s)" in text
    assert "idle 40.0s of 300s" in text and "left: loaded" in text
    assert "could not sleep: x" in text
