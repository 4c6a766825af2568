"""LoRA adapters as deployments, the pure parts: the fleet file (`adapter:` + `base:`),
the base's flags (stable across reloads), what a reload changes, and routing names.

Adapters here are directories holding PEFT's `adapter_config.json`, made in tmp_path;
the fleet files are read with `config.loads` as `fleet check` reads them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vllm_fleet import config
from vllm_fleet.config import ConfigError, FleetConfig
from vllm_fleet.config.schema import fleet_schema
from vllm_fleet.gateway.routing import ByModel, Names, RouteError, Target, match
from vllm_fleet.gpus import Inventory
from vllm_fleet.lora import RUNTIME_ENV, check_lines, fit_rank
from vllm_fleet.plan import EngineSpec, Plan, build_plan
from vllm_fleet.reconcile import Action, AdapterAction, Changes, reconcile

PY = "/opt/py/bin/python3"
NO_GPUS = Inventory(None, "nvidia-smi not found")


def adapter_dir(root: Path, name: str, rank: int = 8) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16})
    )
    return path


def load(root: Path, text: str) -> FleetConfig:
    return config.loads(textwrap.dedent(text), base_dir=str(root), environ={})


def problems(root: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(root, text)
    return {issue.where(): issue.message for issue in info.value.issues}


def plan(cfg: FleetConfig, prior: Plan | None = None) -> Plan:
    return build_plan(cfg, NO_GPUS, PY, prior=prior)


def engine(p: Plan, name: str) -> EngineSpec:
    (found,) = [e for e in p.engines if e.name == name]
    return found


def diff(root: Path, before: str, after: str) -> tuple[Plan, Plan, Changes]:
    old_cfg, new_cfg = load(root, before), load(root, after)
    old = plan(old_cfg)
    new = plan(new_cfg, prior=old)
    return old, new, reconcile(old_cfg, old, new_cfg, new)


BASE = """
deployments:
  chat:
    model: org/chat
    replicas: 2
"""


def with_adapters(*entries: str) -> str:
    return BASE + "".join(textwrap.indent(textwrap.dedent(e), "  ") for e in entries)


BOT = """
bot:
  adapter: ./bot
  base: chat
"""
SECOND = """
second:
  adapter: ./second
  base: chat
  aliases: [second-alias]
"""


def test_an_adapter_is_a_deployment_on_its_base_and_runs_no_engine(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot", rank=8)
    cfg = load(tmp_path, with_adapters(BOT))
    assert list(cfg.deployments) == ["chat"]
    assert list(cfg.adapters) == ["bot"]
    assert cfg.adapters["bot"].lora_rank == 8  # read from adapter_config.json
    assert cfg.adapter_path(cfg.adapters["bot"]) == str((tmp_path / "bot").resolve())
    assert cfg.deployment_ids() == ["chat", "bot"]
    p = plan(cfg)
    assert [e.name for e in p.engines] == ["chat-0", "chat-1"]
    argv = list(engine(p, "chat-0").argv)
    assert argv[argv.index("--enable-lora") :][:5] == [
        "--enable-lora", "--max-loras", "1", "--max-lora-rank", "8",
    ]  # fmt: skip
    assert engine(p, "chat-0").env[RUNTIME_ENV] == "1"


def test_the_base_gets_one_lora_slot_per_adapter_up_to_four_and_a_rank_holding_all(
    tmp_path: Path,
) -> None:
    for name, rank in (("a", 8), ("b", 12), ("c", 8), ("d", 8), ("e", 8)):
        adapter_dir(tmp_path, name, rank)
    entries = [f"{n}:\n  adapter: ./{n}\n  base: chat\n" for n in "abcde"]
    argv = list(engine(plan(load(tmp_path, with_adapters(*entries))), "chat-0").argv)
    assert argv[argv.index("--max-loras") + 1] == "4"
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # 12 fits in vLLM's 16
    assert [fit_rank(r) for r in (1, 2, 8, 9, 64, 300, 500)] == [1, 8, 8, 16, 64, 320, 512]


def test_flags_the_base_sets_itself_are_left_as_written(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot")
    text = """
    deployments:
      chat:
        model: org/chat
        args: [--max-lora-rank, "64", --max-loras=8]
        env: {VLLM_ALLOW_RUNTIME_LORA_UPDATING: "true"}
      bot: {adapter: ./bot, base: chat}
    """
    spec = engine(plan(load(tmp_path, text)), "chat-0")
    argv = list(spec.argv)
    assert argv.count("--enable-lora") == 1
    assert "--max-loras" not in argv and argv.count("--max-lora-rank") == 1
    assert argv[-3:] == ["--max-lora-rank", "64", "--max-loras=8"]
    assert spec.env[RUNTIME_ENV] == "true"


def test_a_base_with_enable_lora_in_its_args_gets_runtime_loading_without_adapters(
    tmp_path: Path,
) -> None:
    spec = engine(
        plan(load(tmp_path, BASE.replace("replicas: 2", "args: [--enable-lora]"))), "chat-0"
    )
    assert spec.env[RUNTIME_ENV] == "1"
    assert list(spec.argv).count("--enable-lora") == 1
    plain = engine(plan(load(tmp_path, BASE)), "chat-0")
    assert RUNTIME_ENV not in plain.env and "--enable-lora" not in plain.argv


def test_adding_and_removing_adapters_restarts_no_engine_of_the_base(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot")
    adapter_dir(tmp_path, "second")
    old, new, changes = diff(tmp_path, with_adapters(BOT), with_adapters(BOT, SECOND))
    assert {s.action for s in changes.steps} == {Action.KEEP}
    assert engine(new, "chat-0").argv == engine(old, "chat-0").argv  # --max-loras stays 1
    assert [(a.action, a.adapter, a.base) for a in changes.adapters] == [
        (AdapterAction.ADD, "second", "chat")
    ]
    assert not changes.empty
    assert any("second (adapter): add" in line and "no engine restarts" in line
               for line in changes.lines())  # fmt: skip
    _, _, removed = diff(tmp_path, with_adapters(BOT, SECOND), BASE)
    assert {s.action for s in removed.steps} == {Action.KEEP}  # LoRA stays on: no restart
    assert [(a.action, a.adapter) for a in removed.adapters] == [
        (AdapterAction.REMOVE, "bot"), (AdapterAction.REMOVE, "second"),
    ]  # fmt: skip


def test_an_adapter_over_the_running_rank_replaces_the_base_and_says_why(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot", rank=8)
    adapter_dir(tmp_path, "big", rank=64)
    big = "big:\n  adapter: ./big\n  base: chat\n"
    _, new, changes = diff(tmp_path, with_adapters(BOT), with_adapters(BOT, big))
    replaced = [s for s in changes.steps if s.action is Action.REPLACE]
    assert [s.name for s in replaced] == ["chat-0", "chat-1"]
    assert "--max-lora-rank 64, over the running engine's 8" in replaced[0].why
    argv = list(engine(new, "chat-0").argv)
    assert argv[argv.index("--max-lora-rank") + 1] == "64"


def test_a_first_adapter_on_a_base_without_lora_replaces_it_and_says_how_to_avoid_it(
    tmp_path: Path,
) -> None:
    adapter_dir(tmp_path, "bot")
    _, _, changes = diff(tmp_path, BASE, with_adapters(BOT))
    (first, _) = [s for s in changes.steps if s.action is Action.REPLACE]
    assert "only turns on at start" in first.why and "--enable-lora" in first.why


def test_a_new_adapter_directory_reloads_it_and_a_new_base_moves_it(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot")
    adapter_dir(tmp_path, "bot2")
    two_bases = BASE + "  other: {model: org/other}\n"
    moved = two_bases + "  bot: {adapter: ./bot, base: other}\n"
    _, _, changes = diff(
        tmp_path, with_adapters(BOT), with_adapters(BOT.replace("./bot", "./bot2"))
    )
    assert [(a.action, a.adapter) for a in changes.adapters] == [(AdapterAction.CHANGE, "bot")]
    _, _, moves = diff(tmp_path, two_bases + "  bot: {adapter: ./bot, base: chat}\n", moved)
    assert [(a.action, a.base) for a in moves.adapters] == [
        (AdapterAction.REMOVE, "chat"), (AdapterAction.ADD, "other"),
    ]  # fmt: skip


def test_an_adapter_reload_with_nothing_changed_is_empty(tmp_path: Path) -> None:
    adapter_dir(tmp_path, "bot")
    _, _, changes = diff(tmp_path, with_adapters(BOT), with_adapters(BOT))
    assert changes.empty and not changes.adapters


def test_bad_adapters_are_refused_at_load_with_their_place_and_a_fix(tmp_path: Path) -> None:
    (tmp_path / "not-peft").mkdir()
    (tmp_path / "file.bin").write_text("x")
    found = problems(
        tmp_path,
        """
        deployments:
          chat: {model: org/chat, aliases: [chat-alias]}
          remote: {model: org/r, endpoints: ["http://10.0.0.1:8000"]}
          a: {adapter: ./missing, base: chat}
          b: {adapter: ./not-peft, base: chat}
          c: {adapter: ./file.bin, base: chat}
          d: {adapter: org/hub-lora, base: nowhere}
          e: {adapter: org/hub-lora, base: remote}
          f: {adapter: org/hub-lora, base: d}
          chat-alias: {adapter: org/hub-lora, base: chat}
          g: {adapter: org/hub-lora, base: chat, aliases: [org/chat]}
          Bad_Id: {adapter: org/hub-lora, base: chat}
        """,
    )
    assert "no directory" in found["deployments.a.adapter"]
    assert "holds no adapter_config.json" in found["deployments.b.adapter"]
    assert "is a file" in found["deployments.c.adapter"]
    assert "not in this file" in found["deployments.d.base"]
    assert "`endpoints:`" in found["deployments.e.base"]
    assert "an adapter itself" in found["deployments.f.base"]
    assert "already a name of deployment `chat`" in found["deployments.chat-alias"]
    assert "already a name of deployment `chat`" in found["deployments.g.aliases[0]"]
    assert "not URL-safe" in found["deployments.Bad_Id"]


def test_engine_keys_on_an_adapter_and_adapter_keys_on_a_model_are_explained(
    tmp_path: Path,
) -> None:
    found = problems(
        tmp_path,
        """
        deployments:
          chat: {model: org/chat, base: other}
          bot: {adapter: org/hub-lora, base: chat, gpus: [0], replica: 2}
        """,
    )
    assert "belongs to an adapter deployment" in found["deployments.chat.base"]
    assert "has no engine of its own; `gpus` belongs on the base" in found["deployments.bot.gpus"]
    assert "did you mean `rank`" not in found["deployments.bot.replica"]
    assert "Known keys of an adapter deployment: adapter, base" in found["deployments.bot.replica"]
    top = problems(tmp_path, BASE + "adapters: {}\n")
    assert "written under `deployments:`" in top["adapters"]


def test_keys_may_name_adapters_and_the_schema_takes_them(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        gateway:
          keys: [{name: team, key: k-1, deployments: [bot], limits: {bot: {rpm: 5}}}]
        deployments:
          chat: {model: org/chat}
          bot: {adapter: org/hub-lora, base: chat, rank: 32}
        """,
    )
    assert cfg.gateway.keys[0].allows("bot") and not cfg.gateway.keys[0].allows("chat")
    assert cfg.adapter_path(cfg.adapters["bot"]) == "org/hub-lora"  # fetched by the engine
    schema = fleet_schema()
    assert "adapters" not in schema["properties"]
    branches = schema["properties"]["deployments"]["additionalProperties"]["anyOf"]
    assert {"$ref": "#/definitions/Adapter"} in branches
    lines = check_lines(cfg, [(e.deployment, e.argv) for e in plan(cfg).engines])
    assert "--enable-lora --max-loras 1 --max-lora-rank 32" in lines[0]
    assert lines[1] == "  bot: org/hub-lora (rank 32)"


def test_routing_names_an_adapter_by_id_and_alias_and_lists_it_with_its_base(
    tmp_path: Path,
) -> None:
    adapter_dir(tmp_path, "bot")
    adapter_dir(tmp_path, "second")
    names = Names(load(tmp_path, with_adapters(BOT, SECOND)))
    assert names.resolve("bot") == "bot"
    assert names.resolve("second-alias") == "second"
    assert names.served["bot"] == "bot"  # the engine serves it as its id
    assert names.bases == {"bot": "chat", "second": "chat"}
    assert "bot (adapter on chat)" in names.listing()
    assert match("/bot/v1/chat/completions", names) == Target(
        "bot",
        "/v1/chat/completions",
        match("/bot/v1/chat/completions", names).style,  # type: ignore[union-attr]
    )
    error = names.resolve("nope")
    assert isinstance(error, RouteError) and "second (adapter on chat)" in error.message


@pytest.mark.parametrize(
    "path",
    [
        "/chat/v1/load_lora_adapter",
        "/chat/v1/unload_lora_adapter/",
        "/openai/deployments/chat/load_lora_adapter",
        "/v1/load_lora_adapter",
        "/v1//unload_lora_adapter",
        "/openai/v1/load_lora_adapter",
    ],
)
def test_runtime_lora_routes_are_refused_on_every_route_style(tmp_path: Path, path: str) -> None:
    names = Names(load(tmp_path, BASE))
    found = match(path, names)
    assert isinstance(found, RouteError), found
    assert found.status == 403 and "loads and unloads LoRA adapters itself" in found.message
    assert isinstance(match("/v1/chat/completions", names), ByModel)
