"""On-demand deployments in the fleet file: their keys and where they apply, GPUs two
on-demand deployments take turns on (swap groups), the sleep-mode flags, and what
`fleet check` says about them. Pure: loading, planning, rendering."""

from __future__ import annotations

import textwrap

import pytest

from vllm_fleet import config
from vllm_fleet.config import ConfigError, ConfigIssue, FleetConfig
from vllm_fleet.gpus import Gpu, Inventory
from vllm_fleet.plan import EngineSpec, Plan, build_plan, process_key
from vllm_fleet.swap_groups import SwapGroup, on_demand_lines

PY = "/opt/py/bin/python3"
NO_INVENTORY = Inventory(None, "nvidia-smi not found")
FAKE = "engine_command: ['{python}', -m, vllm_fleet.testing.fake_vllm, '{model}']\n"
SLEEP_NEEDS_A_GPU = (
    "vLLM's sleep mode needs a GPU (CUDA/ROCm/XPU): the CPU build refuses "
    "--enable-sleep-mode; use sleep: 0 here"
)


def gpus(*indices: int) -> Inventory:
    return Inventory(tuple(Gpu(i, f"GPU-{i}", "NVIDIA H100", 81559, 0, 81000) for i in indices))


def load(text: str, environ: dict[str, str] | None = None) -> FleetConfig:
    return config.loads(textwrap.dedent(text), environ=environ or {})


def problems(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value


def only_issue(err: ConfigError, where: str, line: int) -> ConfigIssue:
    assert [issue.where() for issue in err.issues] == [where], err.render()
    issue = err.issues[0]
    assert issue.line == line, err.render()
    assert f"  line {line}, {where}: {issue.message}" in err.render()
    return issue


def plan(text: str, inventory: Inventory = NO_INVENTORY, prior: Plan | None = None) -> Plan:
    return build_plan(load(text), inventory, PY, prior=prior)


def engine(p: Plan, name: str) -> EngineSpec:
    (found,) = [e for e in p.engines if e.name == name]
    return found


def on_gpus(*deps: tuple[str, str, str]) -> str:
    """Deployments (id, start, gpus) in that order, each with its model."""
    text = "deployments:\n"
    for dep_id, start, listed in deps:
        text += f"  {dep_id}:\n    model: m-{dep_id}\n    start: {start}\n    gpus: {listed}\n"
    return text


# ---------------------------------------------------------------- the keys


def test_defaults_start_with_the_fleet_and_an_on_demand_deployment_gets_documented_ones() -> None:
    cfg = load("deployments:\n  a: {model: m}\n  b: {model: n, start: on_demand}\n")
    a, b = cfg.deployments["a"], cfg.deployments["b"]
    assert (a.start, a.on_demand) == ("always", False)
    assert b.on_demand
    assert (b.idle_timeout, b.sleep, b.swap_group) == (None, 0, None)
    assert (b.queue_timeout, b.max_queued, b.swap_drain_timeout, b.min_hold) == (
        300.0,
        64,
        30.0,
        10.0,
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("idle_timeout", "300"),
        ("sleep", "1"),
        ("sleep", "0"),  # written, even as the default: it says something that is not so
        ("swap_group", "big"),
        ("queue_timeout", "60"),
        ("max_queued", "8"),
        ("swap_drain_timeout", "5"),
        ("min_hold", "0"),
    ],
)
def test_an_on_demand_key_on_a_deployment_started_with_the_fleet_is_refused(
    key: str, value: str
) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    {key}: {value}\n")
    issue = only_issue(err, f"deployments.a.{key}", 4)
    assert issue.message == (
        f"`{key}` only applies to `start: on_demand`; set `start: on_demand` or remove it"
    )


def test_an_on_demand_key_beside_an_explicit_start_always_is_refused_too() -> None:
    err = problems("deployments:\n  a:\n    model: m\n    start: always\n    idle_timeout: 9\n")
    only_issue(err, "deployments.a.idle_timeout", 5)


def test_a_remote_deployment_cannot_be_started_on_demand() -> None:
    err = problems(
        "deployments:\n  r:\n    model: m\n    endpoints: [http://10.0.0.1:8000]\n"
        "    start: on_demand\n"
    )
    issue = only_issue(err, "deployments.r.start", 5)
    assert "the fleet never starts or stops it" in issue.message
    assert "remove `start: on_demand`" in issue.message


def test_on_demand_keys_on_a_remote_deployment_are_refused_without_suggesting_on_demand() -> None:
    err = problems(
        "deployments:\n  r:\n    model: m\n    endpoints: [http://10.0.0.1:8000]\n"
        "    idle_timeout: 30\n"
    )
    issue = only_issue(err, "deployments.r.idle_timeout", 5)
    assert "never started, stopped or swapped by the fleet; remove `idle_timeout`" in issue.message


@pytest.mark.parametrize("value", ["true", "yes", "on", "false"])
def test_sleep_is_a_level_not_a_yes_no(value: str) -> None:
    # pydantic alone would take `true` as level 1.
    err = problems(f"deployments:\n  a:\n    model: m\n    start: on_demand\n    sleep: {value}\n")
    issue = only_issue(err, "deployments.a.sleep", 5)
    assert "not a yes/no" in issue.message and "`sleep: 1`" in issue.message


def test_sleep_takes_levels_0_1_2_also_from_a_variable_and_refuses_others() -> None:
    text = "deployments:\n  a:\n    model: m\n    start: on_demand\n    sleep: ${LEVEL}\n"
    assert load(text, {"LEVEL": "2"}).deployments["a"].sleep == 2
    err = problems(text.replace("${LEVEL}", "3"))
    issue = only_issue(err, "deployments.a.sleep", 5)
    assert "0, 1 or 2" in issue.message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("idle_timeout", "0"),
        ("idle_timeout", "true"),
        ("queue_timeout", "0"),
        ("max_queued", "-1"),
        ("max_queued", "yes"),
        ("swap_drain_timeout", "-1"),
        ("min_hold", "-0.5"),
        ("start", "lazy"),
        ("swap_group", "Big Models"),
    ],
)
def test_out_of_bounds_on_demand_values_are_refused_in_place(key: str, value: str) -> None:
    start = "" if key == "start" else "    start: on_demand\n"
    err = problems(f"deployments:\n  a:\n    model: m\n{start}    {key}: {value}\n")
    only_issue(err, f"deployments.a.{key}", 4 if key == "start" else 5)


def test_a_swap_group_name_follows_the_id_rule() -> None:
    err = problems("deployments:\n  a:\n    model: m\n    start: on_demand\n    swap_group: A!\n")
    issue = only_issue(err, "deployments.a.swap_group", 5)
    assert "is not a swap group name" in issue.message


# ---------------------------------------------------------------- GPUs shared by taking turns


def test_two_on_demand_deployments_on_one_gpu_need_no_share_gpus_nor_memory_fractions() -> None:
    # Each takes vLLM's default 0.92 of the card: fine, only one is loaded at a time.
    p = plan(on_gpus(("a", "on_demand", "[0]"), ("b", "on_demand", "[1, 0]")))
    assert p.groups == (SwapGroup("gpu0+1", ("a", "b"), (0, 1)),)
    assert p.group_of("a") is p.group_of("b") is p.groups[0]
    assert engine(p, "a-0").gpus == (0,) and engine(p, "b-0").gpus == (1, 0)


@pytest.mark.parametrize(("first", "second"), [("always", "on_demand"), ("on_demand", "always")])
def test_an_on_demand_and_an_always_deployment_on_one_gpu_are_refused(
    first: str, second: str
) -> None:
    err = problems(on_gpus(("a", first, "[0]"), ("b", second, "[0]")))
    issue = only_issue(err, "deployments.b.gpus[0]", 9)
    assert issue.message.startswith("GPU 0 is already used by deployment `a`; ")
    assert "set `share_gpus: true` and `--gpu-memory-utilization`" in issue.message
    assert issue.message.endswith("or make both `start: on_demand` to swap them on this GPU")


def test_an_always_deployment_shares_a_gpu_with_on_demand_ones_when_both_say_so() -> None:
    # Memory: the always engine's 0.4 plus the largest of those taking turns (0.6).
    text = (
        "deployments:\n"
        "  a: {model: m1, gpus: [0], share_gpus: true, args: [--gpu-memory-utilization, '0.4']}\n"
        "  b: {model: m2, gpus: [0], start: on_demand, args: [--gpu-memory-utilization, '0.5']}\n"
        "  c: {model: m3, gpus: [0], start: on_demand, args: [--gpu-memory-utilization, '0.6']}\n"
    )
    p = plan(text)
    assert p.groups == (SwapGroup("gpu0", ("b", "c"), (0,)),)
    assert p.group_of("a") is None


def test_memory_on_a_gpu_counts_the_always_engines_and_the_largest_on_demand_one() -> None:
    text = (
        "deployments:\n"
        "  a: {model: m1, gpus: [0], share_gpus: true, args: [--gpu-memory-utilization, '0.5']}\n"
        "  b: {model: m2, gpus: [0], start: on_demand, args: [--gpu-memory-utilization, '0.3']}\n"
        "  c: {model: m3, gpus: [0], start: on_demand, args: [--gpu-memory-utilization, '0.6']}\n"
    )
    issue = only_issue(problems(text), "deployments.c.gpus[0]", 4)
    assert issue.message.startswith(
        "GPU 0 is shared by `a`, `c`, whose --gpu-memory-utilization add up to 1.10 of the card "
        "(of `b`, `c`, which take turns on it, the largest)"
    )


def test_three_on_demand_deployments_on_one_gpu_are_one_group() -> None:
    p = plan(
        on_gpus(("a", "on_demand", "[0]"), ("b", "on_demand", "[0]"), ("c", "on_demand", "[0]"))
    )
    assert p.groups == (SwapGroup("gpu0", ("a", "b", "c"), (0,)),)


def test_groups_join_through_a_member_and_stay_apart_otherwise() -> None:
    p = plan(
        on_gpus(
            ("a", "on_demand", "[0]"),
            ("x", "on_demand", "[2]"),
            ("b", "on_demand", "[0, 1]"),
            ("y", "on_demand", "[2]"),
            ("c", "on_demand", "[1]"),
            ("z", "always", "[3]"),
        )
    )
    assert p.groups == (
        SwapGroup("gpu0+1", ("a", "b", "c"), (0, 1)),
        SwapGroup("gpu2", ("x", "y"), (2,)),
    )
    assert p.group_of("z") is None


def test_a_single_on_demand_deployment_is_no_group() -> None:
    p = plan(on_gpus(("a", "on_demand", "[0]"), ("b", "always", "[1]")))
    assert p.groups == ()
    assert p.group_of("a") is None


def test_a_named_swap_group_without_gpus_is_a_group() -> None:
    p = plan(
        "deployments:\n"
        "  a: {model: m1, start: on_demand, swap_group: big}\n"
        "  solo: {model: m2, start: on_demand}\n"
        "  b: {model: m3, start: on_demand, swap_group: big}\n"
    )
    assert p.groups == (SwapGroup("big", ("a", "b"), ()),)


def test_a_name_names_the_group_its_members_form_on_gpus_and_joins_others_to_it() -> None:
    p = plan(
        "deployments:\n"
        "  a: {model: m1, start: on_demand, gpus: [0]}\n"
        "  b: {model: m2, start: on_demand, gpus: [0], swap_group: pair}\n"
        "  c: {model: m3, start: on_demand, gpus: [1], swap_group: pair}\n"
    )
    assert p.groups == (SwapGroup("pair", ("a", "b", "c"), (0, 1)),)


def test_counted_gpus_are_the_planned_ones_in_a_group() -> None:
    p = plan(
        "deployments:\n"
        "  a: {model: m1, start: on_demand, gpus: 1, swap_group: g}\n"
        "  b: {model: m2, start: on_demand, gpus: 1, swap_group: g}\n",
        gpus(0, 1),
    )
    assert p.groups == (SwapGroup("g", ("a", "b"), (0, 1)),)


def test_two_names_for_deployments_sharing_gpus_are_refused_asking_for_one() -> None:
    text = (
        "deployments:\n"
        "  a: {model: m1, start: on_demand, gpus: [0], swap_group: one}\n"
        "  b: {model: m2, start: on_demand, gpus: [0, 1]}\n"
        "  c: {model: m3, start: on_demand, gpus: [1], swap_group: two}\n"
    )
    issue = only_issue(problems(text), "deployments.c.swap_group", 4)
    assert "`c` shares GPUs with `a` of swap group `one`" in issue.message
    assert "give them one name (`swap_group: one`)" in issue.message


def test_a_name_the_fleet_gives_another_group_is_refused_at_plan_time() -> None:
    text = (
        "deployments:\n"
        "  a: {model: m1, start: on_demand, gpus: [0]}\n"
        "  b: {model: m2, start: on_demand, gpus: [0]}\n"
        "  x: {model: m3, start: on_demand, swap_group: gpu0}\n"
        "  y: {model: m4, start: on_demand, swap_group: gpu0}\n"
    )
    with pytest.raises(ConfigError) as info:
        plan(text)
    (issue,) = info.value.issues
    assert (issue.where(), issue.line) == ("deployments.x.swap_group", 4)
    assert "`gpu0` is also the name the fleet gives the swap group `a`, `b`" in issue.message


def test_always_deployments_sharing_a_gpu_keep_todays_rules_and_form_no_group() -> None:
    util = "share_gpus: true, args: [--gpu-memory-utilization, '0.45']"
    p = plan(
        "deployments:\n"
        f"  a: {{model: m1, gpus: [0], {util}}}\n"
        f"  b: {{model: m2, gpus: [0], {util}}}\n"
    )
    assert p.groups == ()


def test_a_plan_made_without_groups_has_none() -> None:
    assert Plan((), (), NO_INVENTORY).groups == ()


def test_a_prior_plan_keeps_on_demand_engines_in_place_and_start_changes_no_process() -> None:
    before = on_gpus(("a", "on_demand", "[0]"), ("b", "on_demand", "[0]"), ("c", "always", "[1]"))
    old = plan(before)
    # A deployment inserted first, and `c` made on demand: no engine moves or changes.
    after = "deployments:\n  new: {model: m-new}\n" + before.removeprefix("deployments:\n")
    after = after.replace("start: always", "start: on_demand\n    idle_timeout: 60")
    new = plan(after, prior=old)
    for name in ("a-0", "b-0", "c-0"):
        assert process_key(engine(new, name)) == process_key(engine(old, name)), name
        assert engine(new, name).vllm_ports == engine(old, name).vllm_ports
    assert new.groups == old.groups == (SwapGroup("gpu0", ("a", "b"), (0,)),)


# ---------------------------------------------------------------- sleep mode


SLEEPY = "deployments:\n  a:\n    model: m\n    start: on_demand\n    gpus: [0]\n"


def test_sleep_adds_the_flag_and_the_dev_mode_vllm_needs_for_it() -> None:
    e = engine(plan(SLEEPY + "    sleep: 1\n", gpus(0)), "a-0")
    assert e.argv.count("--enable-sleep-mode") == 1
    assert e.env["VLLM_SERVER_DEV_MODE"] == "1"


def test_sleep_0_starts_the_engine_without_them() -> None:
    e = engine(plan(SLEEPY, gpus(0)), "a-0")
    assert "--enable-sleep-mode" not in e.argv
    assert "VLLM_SERVER_DEV_MODE" not in e.env


@pytest.mark.parametrize("flag", ["--enable-sleep-mode", "--enable_sleep_mode"])
def test_sleep_mode_already_in_args_is_not_added_twice(flag: str) -> None:
    e = engine(plan(SLEEPY + f"    sleep: 2\n    args: [{flag}]\n", gpus(0)), "a-0")
    assert [a for a in e.argv if a.replace("_", "-") == "--enable-sleep-mode"] == [flag]


def test_sleep_with_replicas_puts_every_replica_in_sleep_mode() -> None:
    p = plan(
        "deployments:\n  a: {model: m, start: on_demand, sleep: 1, replicas: 2, gpus: [0, 1]}\n",
        gpus(0, 1),
    )
    assert all("--enable-sleep-mode" in e.argv for e in p.engines) and len(p.engines) == 2
    assert p.warnings == ()


def test_sleep_on_a_machine_without_a_gpu_is_warned_about() -> None:
    p = plan(SLEEPY + "    sleep: 1\n")
    assert p.warnings == (
        "`a` has `sleep: 1` and this machine's GPU inventory finds no GPU (nvidia-smi not "
        f"found): {SLEEP_NEEDS_A_GPU}",
    )
    unpinned = SLEEPY.replace("    gpus: [0]\n", "")
    assert plan(unpinned + "    sleep: 1\n", Inventory(())).warnings[0].endswith(SLEEP_NEEDS_A_GPU)
    assert plan(SLEEPY + "    sleep: 1\n", gpus(0)).warnings == ()


def test_sleep_with_an_engine_that_is_not_vllm_is_fine_without_a_gpu() -> None:
    p = plan(FAKE + SLEEPY + "    sleep: 1\n")
    assert "--enable-sleep-mode" in engine(p, "a-0").argv  # the fake engine takes it
    assert p.warnings == ()


def test_sleep_on_tcp_is_warned_about_for_the_dev_routes_it_opens() -> None:
    p = plan(SLEEPY + "    sleep: 1\n    listen: tcp\n", gpus(0))
    (warning,) = p.warnings
    assert "VLLM_SERVER_DEV_MODE=1" in warning and "/collective_rpc" in warning
    assert "remove `listen: tcp`" in warning


# ---------------------------------------------------------------- what `fleet check` says


def test_on_demand_lines_say_per_group_and_deployment_what_happens() -> None:
    text = (
        "engines: {start_timeout: 600}\n"
        "deployments:\n"
        "  always: {model: m0, gpus: [2]}\n"
        "  a: {model: m1, start: on_demand, gpus: [0], idle_timeout: 300}\n"
        "  b: {model: m2, start: on_demand, gpus: [0], sleep: 1, max_queued: 8, min_hold: 5}\n"
        "  solo: {model: m3, start: on_demand, gpus: [1], sleep: 2, idle_timeout: 60,\n"
        "         queue_timeout: 30, start_timeout: 900}\n"
    )
    cfg = load(text)
    p = build_plan(cfg, gpus(0, 1, 2), PY)
    assert on_demand_lines(cfg, p.groups) == [
        "on-demand deployments (started by their first request, not with the fleet):",
        "swap group gpu0: GPUs 0; members: a, b (one loaded at a time)",
        "a (swap group gpu0)",
        "  on request: cold start (start_timeout 600s)",
        "  when idle: unloaded after 300s idle",
        "  queues up to 64 requests for 300s",
        "  swapped out: unloaded once its requests had 30s to finish; once loaded it keeps "
        "its turn at least 10s",
        "b (swap group gpu0)",
        "  on request: wake from sleep level 1; the first time, cold start (start_timeout 600s)",
        "  when idle: kept loaded until another member needs the GPUs",
        "  queues up to 8 requests for 300s",
        "  swapped out: slept at level 1 once its requests had 30s to finish; once loaded it "
        "keeps its turn at least 5s",
        "solo",
        "  on request: wake from sleep level 2 (its weights read again); the first time, cold "
        "start (start_timeout 900s)",
        "  when idle: slept at level 2 after 60s idle",
        "  queues up to 64 requests for 30s",
    ]


def test_on_demand_lines_are_none_without_an_on_demand_deployment() -> None:
    cfg = load("deployments:\n  a: {model: m}\n")
    assert on_demand_lines(cfg, ()) == []


def test_a_gpu_count_on_demand_that_cannot_be_filled_says_to_list_the_gpu() -> None:
    text = textwrap.dedent(
        """
        deployments:
          a: {model: org/a, gpus: 1, start: on_demand}
          b: {model: org/b, gpus: 1, start: on_demand}
        """
    )
    with pytest.raises(ConfigError) as caught:
        plan(text, gpus(0))
    assert "take turns on GPUs they list by index (`gpus: [0]`)" in caught.value.render()
