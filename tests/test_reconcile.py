"""Reload by diff, the pure part: a stable plan (`build_plan(..., prior=)`) and
`reconcile`, which says per engine what a reload does and why."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vllm_fleet import config
from vllm_fleet.config import FleetConfig
from vllm_fleet.gpus import Gpu, Inventory
from vllm_fleet.plan import EngineSpec, Plan, build_plan
from vllm_fleet.reconcile import Action, Changes, Step, reconcile

PY = "/opt/py/bin/python3"
NO_GPUS = Inventory(None, "nvidia-smi not found")


def gpus(*indices: int) -> Inventory:
    return Inventory(tuple(Gpu(i, f"GPU-{i}", "NVIDIA H100", 81559, 0, 81000) for i in indices))


def cfg(text: str) -> FleetConfig:
    return config.loads(textwrap.dedent(text), environ={})


def diff(before: str, after: str, inventory: Inventory = NO_GPUS) -> tuple[Plan, Plan, Changes]:
    old_config, new_config = cfg(before), cfg(after)
    old = build_plan(old_config, inventory, PY)
    new = build_plan(new_config, inventory, PY, prior=old)
    return old, new, reconcile(old_config, old, new_config, new)


def step(changes: Changes, name: str) -> Step:
    (found,) = [s for s in changes.steps if s.name == name]
    return found


def engine(plan: Plan, name: str) -> EngineSpec:
    (found,) = [e for e in plan.engines if e.name == name]
    return found


TWO = """
deployments:
  chat: {model: org/chat}
  embed: {model: org/embed, args: [--max-model-len, "512"]}
"""


def test_an_unchanged_file_changes_nothing() -> None:
    old, new, changes = diff(TWO, TWO)
    assert new.engines == old.engines
    assert changes.empty
    assert [s.action for s in changes.steps] == [Action.KEEP, Action.KEEP]
    assert changes.lines()[-1].startswith("nothing to change")


TWO_TCP = TWO.replace("{model: org/chat}", "{model: org/chat, listen: tcp}").replace(
    "{model: org/embed,", "{model: org/embed, listen: tcp,"
)


@pytest.mark.parametrize("before", [TWO, TWO_TCP], ids=["uds", "tcp"])
def test_a_deployment_added_first_renumbers_no_running_engine(before: str) -> None:
    listen = "tcp" if before is TWO_TCP else "uds"
    after = (
        f"deployments:\n  new: {{model: org/new, listen: {listen}}}\n"
        + before.split("deployments:\n", 1)[1]
    )
    old, new, changes = diff(before, after)
    # Without the running plan, `new` would take chat's port and VLLM_PORT range.
    fresh = build_plan(cfg(after), NO_GPUS, PY)
    assert engine(fresh, "new-0").vllm_ports == engine(old, "chat-0").vllm_ports
    if listen == "tcp":
        assert engine(fresh, "new-0").port == engine(old, "chat-0").port
    for name in ("chat-0", "embed-0"):
        assert engine(new, name) == engine(old, name)
        assert step(changes, name).action is Action.KEEP
    added = engine(new, "new-0")
    if listen == "tcp":
        assert added.port not in {e.port for e in old.engines}
    else:
        assert added.port is None and added.uds is not None
        assert added.uds not in {e.uds for e in old.engines}
    assert all(
        added.vllm_ports is not None
        and e.vllm_ports is not None
        and set(added.vllm_ports).isdisjoint(e.vllm_ports)
        for e in old.engines
    )
    assert step(changes, "new-0").action is Action.START
    assert changes.added == ("new",)
    assert "new (new):" in changes.lines()


def test_changed_args_replace_the_engine_beside_the_old_one_on_a_port_of_its_own() -> None:
    old, new, changes = diff(TWO, TWO.replace('"512"', '"1024"'))
    replace = step(changes, "embed-0")
    assert replace.action is Action.REPLACE
    assert replace.beside
    assert replace.why == "args changed"
    # The new engine runs beside the old one, on a socket of its own; the one after it
    # takes the first name free again.
    old_socket, new_socket = engine(old, "embed-0").uds, engine(new, "embed-0").uds
    assert old_socket is not None and new_socket is not None
    assert (old_socket.name, new_socket.name) == ("embed-0.sock", "embed-0.1.sock")
    assert step(changes, "chat-0").action is Action.KEEP
    third = build_plan(cfg(TWO), NO_GPUS, PY, prior=new)
    assert engine(third, "embed-0").uds == old_socket
    assert engine(third, "chat-0") == engine(new, "chat-0")


def test_changed_args_on_tcp_replace_the_engine_beside_on_a_port_of_its_own() -> None:
    old, new, changes = diff(TWO_TCP, TWO_TCP.replace('"512"', '"1024"'))
    assert step(changes, "embed-0").beside
    assert engine(new, "embed-0").port not in {e.port for e in old.engines}


def test_an_engine_moved_from_tcp_to_a_socket_is_replaced_beside() -> None:
    old, new, changes = diff(TWO_TCP, TWO)
    replace = step(changes, "chat-0")
    assert replace.action is Action.REPLACE and replace.beside
    assert "listen changed" in replace.why
    assert (engine(old, "chat-0").uds, engine(new, "chat-0").port) == (None, None)


def test_a_new_socket_dir_replaces_every_engine_on_a_socket(tmp_path: Path) -> None:
    after = f"engines: {{socket_dir: {tmp_path}}}\n" + TWO
    _, new, changes = diff(TWO, after)
    assert [s.action for s in changes.steps] == [Action.REPLACE, Action.REPLACE]
    assert step(changes, "chat-0").why == "engines.socket_dir changed"
    assert engine(new, "chat-0").uds == tmp_path / "chat-0.sock"


def test_a_fixed_port_or_the_same_gpus_mean_stop_first() -> None:
    before = "deployments:\n  a: {model: m, listen: tcp, port: 9000}\n"
    _, _, changes = diff(before, before.replace("model: m", "model: m, args: [-x]"))
    assert step(changes, "a-0").action is Action.REPLACE
    assert not step(changes, "a-0").beside
    before = "deployments:\n  a: {model: m, gpus: [0]}\n"
    _, _, changes = diff(before, before.replace("model: m", "model: m2"), gpus(0, 1))
    assert step(changes, "a-0").action is Action.REPLACE
    assert not step(changes, "a-0").beside
    assert "drained and stopped first" in step(changes, "a-0").describe()


def test_counted_gpus_go_to_free_gpus_so_a_replace_can_run_beside() -> None:
    before = "deployments:\n  a: {model: m, gpus: 1}\n"
    old, new, changes = diff(before, before.replace("model: m", "model: m2"), gpus(0, 1))
    assert engine(old, "a-0").gpus == (0,)
    assert engine(new, "a-0").gpus == (1,)
    assert step(changes, "a-0").beside
    # With no GPU left over, the new engine needs the old one's GPU: stop first.
    old, new, changes = diff(before, before.replace("model: m", "model: m2"), gpus(0))
    assert engine(new, "a-0").gpus == (0,)
    assert not step(changes, "a-0").beside


def test_a_start_waits_for_the_stop_that_frees_its_gpus() -> None:
    before = "deployments:\n  a: {model: m, gpus: [0]}\n  b: {model: n, gpus: [1]}\n"
    after = "deployments:\n  b: {model: n, gpus: [1]}\n  c: {model: o, gpus: [0]}\n"
    _, _, changes = diff(before, after, gpus(0, 1))
    assert step(changes, "a-0").action is Action.STOP
    assert step(changes, "a-0").why == "deployment removed from the file"
    assert step(changes, "c-0").action is Action.START
    assert step(changes, "c-0").after == ("a-0",)
    assert step(changes, "b-0").action is Action.KEEP
    assert changes.removed == ("a",)


def test_replicas_scale_up_and_down_by_starting_and_stopping_the_last_ones() -> None:
    before = "deployments:\n  a: {model: m, replicas: 2}\n"
    _, _, changes = diff(before, before.replace("2", "3"))
    assert [(s.name, s.action) for s in changes.steps] == [
        ("a-0", Action.KEEP),
        ("a-1", Action.KEEP),
        ("a-2", Action.START),
    ]
    assert step(changes, "a-2").why == "replicas 2 -> 3"
    _, _, changes = diff(before, before.replace("2", "1"))
    assert step(changes, "a-1").action is Action.STOP
    assert step(changes, "a-1").why == "replicas 2 -> 1"


def test_aliases_are_a_gateway_change_that_keeps_the_engine() -> None:
    _, new, changes = diff(TWO, TWO.replace("{model: org/chat}", "{model: org/chat, aliases: [c]}"))
    update = step(changes, "chat-0")
    assert update.action is Action.UPDATE  # same process; the next restart gets the name
    assert "c" in engine(new, "chat-0").served_names
    assert "chat: aliases - -> c (in place)" in [
        line.removeprefix("gateway: ") for line in changes.lines()
    ]


def test_a_new_gateway_port_is_refused_and_nothing_else_is_planned() -> None:
    after = "gateway: {port: 9999}\n" + TWO.replace("org/chat", "org/other")
    _, _, changes = diff(TWO, after)
    assert changes.steps == ()
    (refused,) = changes.refused
    assert refused.startswith("gateway.port changed from 8080 to 9999")
    assert "restart" in refused


def test_engine_settings_apply_in_place_and_keep_every_engine() -> None:
    _, _, changes = diff(TWO, "engines: {stop_timeout: 5, health_interval: 1}\n" + TWO)
    assert all(s.action is Action.KEEP for s in changes.steps)
    assert set(changes.settings) == {"stop_timeout: 30.0 -> 5.0", "health_interval: 2.0 -> 1.0"}
    assert not changes.empty


def test_a_gateway_key_change_names_the_key_but_never_an_api_key() -> None:
    _, _, changes = diff(TWO, "gateway: {api_keys: [sk-secret], max_body_mb: 8}\n" + TWO)
    assert "api_keys changed" in changes.gateway
    assert "max_body_mb: 32.0 -> 8.0" in changes.gateway
    assert "sk-secret" not in " ".join(changes.lines())


def test_remote_endpoints_start_stop_and_replace_without_processes() -> None:
    before = "deployments:\n  r: {model: m, endpoints: [http://10.0.0.1:8000]}\n"
    after = (
        "deployments:\n  r: {model: m, endpoints: [http://10.0.0.2:8000, http://10.0.0.3:8000]}\n"
    )
    _, _, changes = diff(before, after)
    assert step(changes, "r-0").action is Action.REPLACE
    assert not step(changes, "r-0").managed
    assert step(changes, "r-1").action is Action.START
    assert "(remote endpoint)" in step(changes, "r-1").describe()


def test_an_engine_that_had_failed_is_restarted_even_when_the_file_keeps_it() -> None:
    old_config = cfg(TWO)
    old = build_plan(old_config, NO_GPUS, PY)
    new = build_plan(cfg(TWO), NO_GPUS, PY, prior=old)
    changes = reconcile(old_config, old, cfg(TWO), new, failed=frozenset({"embed-0"}))
    assert step(changes, "embed-0").action is Action.RESTART
    assert step(changes, "embed-0").describe() == "embed-0: restart (it had failed)"
    assert step(changes, "chat-0").action is Action.KEEP
    assert not changes.empty
