"""Who may reload the fleet (`POST /fleet/reload`), decided by `gateway/admin.py`."""

from __future__ import annotations

import json

import pytest

from vllm_fleet import config
from vllm_fleet.gateway.admin import (
    EngineAsk,
    ReloadAsk,
    engine_request,
    is_loopback,
    metrics_denied,
    reload_request,
)
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.errors import Reply
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry


def core(keys: list[str] | None = None) -> Core:
    text = "deployments: {a: {model: m}}\n"
    if keys:
        text = f"gateway: {{api_keys: {json.dumps(keys)}}}\n" + text
    cfg = config.loads(text, environ={})
    return Core(cfg, Registry(cfg, build_plan(cfg, Inventory(None, "test"), "py")))


def ask(c: Core, body: bytes = b"", peer: str = "127.0.0.1", **kw: str) -> ReloadAsk | Reply:
    return reload_request(
        c, kw.get("method", "POST"), kw.get("query", ""), body, peer,
        kw.get("api_key"), kw.get("authorization"),
    )  # fmt: skip


def error(reply: ReloadAsk | Reply) -> tuple[int, dict[str, str]]:
    assert isinstance(reply, Reply), reply
    return reply.status, json.loads(reply.body)["error"]


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.5.6.7", "::1", "::ffff:127.0.0.1"])
def test_without_keys_this_machine_may_reload(peer: str) -> None:
    assert is_loopback(peer)
    assert ask(core(), peer=peer) == ReloadAsk(None, False)


@pytest.mark.parametrize(
    "peer", ["10.1.2.3", "192.168.0.9", "::ffff:10.0.0.1", "", "not-an-address"]
)
def test_without_keys_another_machine_is_refused_saying_what_to_do(peer: str) -> None:
    status, err = error(ask(core(), peer=peer))
    assert status == 403
    assert "only from this machine" in err["message"] and "gateway.api_keys" in err["message"]


def test_with_keys_a_key_is_needed_from_anywhere() -> None:
    c = core(["sk-admin"])
    assert error(ask(c))[0] == 401  # loopback without a key
    assert ask(c, peer="10.1.2.3", authorization="Bearer sk-admin") == ReloadAsk(None, False)
    assert ask(c, api_key="sk-admin") == ReloadAsk(None, False)
    assert error(ask(c, authorization="Bearer sk-wrong"))[0] == 401


def test_the_body_names_a_file_and_a_dry_run() -> None:
    c = core()
    assert ask(c, b'{"file": "/srv/f.yaml", "dry_run": true}') == ReloadAsk("/srv/f.yaml", True)
    assert ask(c, query="dry_run=1") == ReloadAsk(None, True)
    assert ask(c, query="dry_run=0") == ReloadAsk(None, False)


@pytest.mark.parametrize(
    ("body", "param"),
    [(b"[1]", None), (b"{bad", None), (b'{"file": 3}', "file"), (b'{"dry_run": "yes"}', "dry_run")],
)
def test_a_bad_body_is_a_400(body: bytes, param: str | None) -> None:
    status, err = error(ask(core(), body))
    assert status == 400
    assert err["param"] == param


def test_only_post_reloads() -> None:
    reply = ask(core(), method="GET")
    assert error(reply)[0] == 405
    assert isinstance(reply, Reply) and ("Allow", "POST") in reply.headers


# ---------------------------------------------------------------- /fleet/engines/{engine}/...


def engine_ask(c: Core, path: str, method: str = "GET", **kw: str) -> EngineAsk | Reply:
    return engine_request(
        c, method, path, kw.get("peer", "127.0.0.1"), kw.get("api_key"), kw.get("authorization")
    )


def test_an_engine_is_restarted_with_post_and_its_metrics_read_with_get() -> None:
    c = core()
    assert engine_ask(c, "/fleet/engines/a-0/restart", "POST") == EngineAsk("a-0", "restart")
    assert engine_ask(c, "/fleet/engines/a-0/metrics") == EngineAsk("a-0", "metrics")
    status, err = error(engine_ask(c, "/fleet/engines/a-0/restart"))
    assert status == 405 and err["code"] == "method_not_allowed"
    status, err = error(engine_ask(c, "/fleet/engines/a-0/metrics", "POST"))
    assert status == 405
    status, err = error(engine_ask(c, "/fleet/engines/b-0/metrics"))
    assert status == 404 and "engines: a-0" in err["message"]
    status, err = error(engine_ask(c, "/fleet/engines/a-0/stop", "POST"))
    assert status == 404 and "/restart" in err["message"]


def test_restarting_is_for_an_admin_and_metrics_for_whoever_may_read_metrics() -> None:
    assert (
        error(engine_ask(core(), "/fleet/engines/a-0/restart", "POST", peer="10.1.2.3"))[0] == 403
    )
    # Without keys another machine may read an engine's metrics, as /metrics.
    assert engine_ask(core(), "/fleet/engines/a-0/metrics", peer="10.1.2.3") == EngineAsk(
        "a-0", "metrics"
    )
    c = core(["sk-admin"])
    assert error(engine_ask(c, "/fleet/engines/a-0/metrics"))[0] == 401
    ask = engine_ask(c, "/fleet/engines/a-0/restart", "POST", authorization="Bearer sk-admin")
    assert ask == EngineAsk("a-0", "restart")
    public = config.loads(
        "gateway: {api_keys: [sk-admin], metrics_public: true}\ndeployments: {a: {model: m}}\n",
        environ={},
    )
    c = Core(public, Registry(public, build_plan(public, Inventory(None, "test"), "py")))
    assert engine_ask(c, "/fleet/engines/a-0/metrics") == EngineAsk("a-0", "metrics")
    assert metrics_denied(c, None, None, "/fleet/targets") is None
