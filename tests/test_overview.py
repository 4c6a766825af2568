"""The status page's JSON (gateway/overview.py), from a core whose upstreams are set by
hand: what it says of LoRA adapters, remote endpoints, log tails and keys."""

from __future__ import annotations

from vllm_fleet import config
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.overview import Readings, overview, wants_tail
from vllm_fleet.gpus import GpuUse, Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry, State

FLEET = """
deployments:
  chat: {model: org/chat, replicas: 2}
  support: {adapter: org/support-lora, base: chat}
  far: {model: org/far, endpoints: ["http://10.1.2.3:8000"]}
"""


def core() -> Core:
    cfg = config.loads(FLEET, environ={})
    return Core(cfg, Registry(cfg, build_plan(cfg, Inventory(None, "test"), "py")))


def readings(tails: dict[str, list[str]] | None = None) -> Readings:
    return Readings(1e9, "node-a", tails or {}, GpuUse(None, "none"), {"restart": True})


def by_id(data: dict, dep_id: str) -> dict:  # type: ignore[type-arg]
    return next(d for d in data["deployments"] if d["id"] == dep_id)


def test_an_adapter_is_loading_until_held_and_failed_when_every_engine_refused_it() -> None:
    c = core()
    ups = c.registry.upstreams("chat")
    for up in ups:
        up.set_state(State.READY)
    assert by_id(overview(c, readings()), "support")["state"] == "loading"
    for up in ups:
        up.adapter_errors["support"] = "no such adapter"
    support = by_id(overview(c, readings()), "support")
    assert (support["kind"], support["base"], support["state"]) == ("adapter", "chat", "failed")
    ups[0].adapter_errors.clear()
    ups[0].adapters["support"] = "org/support-lora"
    support = by_id(overview(c, readings()), "support")
    assert (support["state"], support["ready"]) == ("loaded", 1)


def test_a_remote_endpoint_is_shown_on_its_own_host_without_engine_fields() -> None:
    far = by_id(overview(core(), readings()), "far")
    (up,) = far["upstreams"]
    assert far["kind"] == "endpoints" and up["managed"] is False
    assert (up["node"], up["pid"], up["port"], up["socket"]) == ("10.1.2.3", None, None, None)
    assert wants_tail(core().registry.upstreams("far")[0]) == 0


def test_log_tails_are_asked_for_loading_and_failed_engines_and_shown_masked() -> None:
    c = core()
    first, second = c.registry.upstreams("chat")
    first.set_state(State.STARTING)
    second.set_state(State.FAILED, "exited with status 1")
    assert (wants_tail(first), wants_tail(second)) == (1, 20)
    second.set_state(State.READY)
    assert wants_tail(second) == 0
    tails = {first.name: ["INFO non-default args: {'api_key': ['sk-secret-1']}"]}
    (shown,) = by_id(overview(c, readings(tails)), "chat")["upstreams"][0]["log_tail"]
    assert "sk-secret-1" not in shown and "'api_key': ['****']" in shown


def test_keys_are_counted_by_name_in_one_row_each() -> None:
    c = core()
    c.metrics.key_requests.update(
        {("team", "chat", 200): 5, ("team", "chat", 503): 1, ("team", "far", 429): 2,
         ("ops", "chat", 200): 1}
    )  # fmt: skip
    c.metrics.key_tokens.update({("team", "chat"): [100, 40], ("team", "far"): [10, 2]})
    assert overview(c, readings())["keys"] == [
        {"name": "ops", "requests": 1, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0},
        {"name": "team", "requests": 8, "errors": 1, "prompt_tokens": 110, "completion_tokens": 42},
    ]
