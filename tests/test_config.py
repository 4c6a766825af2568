"""The fleet file fails loudly at load: every problem names its place, its line and a fix.

All tests go through `config.loads(text, environ=...)` (or `config.load(path)`), the way
`fleet check` and `fleet up` read a file; no environment variable of the test run leaks in.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vllm_fleet import config
from vllm_fleet.config import ConfigError, ConfigIssue, FleetConfig, flags
from vllm_fleet.plan import served_names


def load(text: str, environ: dict[str, str] | None = None) -> FleetConfig:
    return config.loads(textwrap.dedent(text), environ=environ or {})


def problems(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    return info.value


def places(err: ConfigError) -> list[str]:
    return [issue.where() for issue in err.issues]


def only_issue(err: ConfigError, where: str, line: int | None) -> ConfigIssue:
    """The error holds exactly one problem, at `where` on `line`, and renders it so."""
    assert places(err) == [where], err.render()
    issue = err.issues[0]
    assert issue.line == line, err.render()
    at = f"line {line}, " if line else ""
    assert f"  {at}{where}: {issue.message}" in err.render()
    return issue


# ---------------------------------------------------------------- a valid file


def test_minimal_file_gets_documented_defaults() -> None:
    cfg = load(
        """
        deployments:
          qwen:
            model: Qwen/Qwen2.5-1.5B-Instruct
        """
    )
    assert (cfg.gateway.host, cfg.gateway.port) == ("127.0.0.1", 8080)
    assert cfg.engine_command == ["vllm", "serve", "{model}"]
    dep = cfg.deployments["qwen"]
    assert dep.host == "127.0.0.1"  # engines never listen on the network by default
    assert (dep.gpus, dep.port, dep.replicas, dep.aliases, dep.command) == (None, None, 1, [], None)


ISSUE_EXAMPLE = """\
gateway:
  host: 127.0.0.1
  port: 8080
engine_command: ["vllm", "serve", "{model}"]
deployments:
  qwen:
    model: Qwen/Qwen2.5-1.5B-Instruct
    gpus: [0]
    args: ["--enforce-eager"]
    env: {HF_TOKEN: "${HF_TOKEN}"}
    listen: tcp
    port: 8000
    replicas: 1
    aliases: ["qwen2.5"]
  mistral:
    model: mistralai/Mistral-Small-3.1-24B-Instruct-2503
    gpus: [1, 2]
    args: ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral",
           "--tool-call-parser", "mistral", "--enable-auto-tool-choice", "--limit-mm-per-prompt",
           "{\\"image\\":10}", "--tensor-parallel-size", "2"]
  remote:
    model: meta-llama/Llama-3.1-8B-Instruct
    endpoints: ["http://10.1.2.3:8000/"]
"""


def test_the_issue_example_loads_as_written() -> None:
    cfg = config.loads(ISSUE_EXAMPLE, environ={"HF_TOKEN": "hf_abc"})
    assert list(cfg.deployments) == ["qwen", "mistral", "remote"]
    assert cfg.deployments["qwen"].env == {"HF_TOKEN": "hf_abc"}
    assert cfg.deployments["mistral"].args[10] == '{"image":10}'
    remote = cfg.deployments["remote"]
    assert remote.remote and remote.endpoints == ["http://10.1.2.3:8000"]  # slash dropped


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "where", "line", "hint"),
    [
        ("gateway:\n  prot: 9000\ndeployments: {a: {model: m}}\n", "gateway.prot", 2, "port"),
        ("engines:\n  base_prot: 9000\ndeployments: {a: {model: m}}\n", "engines.base_prot", 2,
         "base_port"),
        ("deployment:\n  a: {model: m}\ndeployments: {a: {model: m}}\n", "deployment", 1,
         "deployments"),
        ("deployments:\n  qwen:\n    model: m\n    gpu: [0]\n", "deployments.qwen.gpu", 4, "gpus"),
        ("deployments:\n  qwen:\n    model: m\n    alias: [x]\n", "deployments.qwen.alias", 4,
         "aliases"),
    ],
)  # fmt: skip
def test_unknown_key_names_place_line_and_did_you_mean(
    text: str, where: str, line: int, hint: str
) -> None:
    issue = only_issue(problems(text), where, line)
    key = where.rsplit(".", 1)[-1]
    assert f"unknown key `{key}`; did you mean `{hint}`?" in issue.message
    assert "Known keys here:" in issue.message and hint in issue.message


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    issue = only_issue(
        problems("deployments:\n  qwen:\n    model: m\n    zzzzzz: 1\n"),
        "deployments.qwen.zzzzzz",
        4,
    )
    assert "did you mean" not in issue.message
    assert "Known keys here: model, gpus, share_gpus, args, env," in issue.message


@pytest.mark.parametrize("value", ["fast", "aiohttp"])
def test_the_removed_gateway_server_key_is_refused_saying_it_is_gone(value: str) -> None:
    err = problems(f"gateway:\n  port: 9000\n  server: {value}\ndeployments: {{a: {{model: m}}}}\n")
    issue = only_issue(err, "gateway.server", 3)
    assert issue.message.startswith("`server` was removed: the gateway has one HTTP server now")
    assert "delete this key" in issue.message
    assert "unknown key" not in issue.message


def test_gateway_drain_timeout_is_refused_saying_where_it_moved() -> None:
    err = problems("gateway:\n  drain_timeout: 5\ndeployments: {a: {model: m}}\n")
    issue = only_issue(err, "gateway.drain_timeout", 2)
    assert "moved to `engines.drain_timeout`" in issue.message
    assert "unknown key" not in issue.message


def test_lingering_defaults_follow_nginx_and_bad_bounds_are_refused() -> None:
    gateway = load("deployments: {a: {model: m}}\n").gateway
    assert (gateway.lingering_time, gateway.lingering_timeout) == (30.0, 5.0)  # nginx's
    assert gateway.lingering_max_bytes == 128 * 1024 * 1024
    err = problems(
        "gateway:\n  lingering_time: -1\n  lingering_timeout: 0\n  lingering_max_mb: 0\n"
        "deployments: {a: {model: m}}\n"
    )
    assert places(err) == [
        "gateway.lingering_time",
        "gateway.lingering_timeout",
        "gateway.lingering_max_mb",
    ]


def test_internal_fields_cannot_be_set_from_the_file() -> None:
    err = problems("base_dir: /etc\nsource: x\ndeployments: {a: {model: m}}\n")
    assert places(err) == ["base_dir", "source"]
    assert all(issue.message == "unknown key" for issue in err.issues)


def test_an_id_starting_with_int_keeps_its_place_in_errors() -> None:
    # pydantic's union tags (`list[constrained-int]`, `constrained-int`) sit in error
    # locations; stripping them by prefix once swallowed ids like `internlm`.
    err = problems(
        """
        deployments:
          internlm:
            model: internlm/internlm2_5-7b-chat
            gpus: [a]
            modell: x
        """
    )
    assert places(err) == ["deployments.internlm.gpus[0]", "deployments.internlm.modell"]
    assert "did you mean `model`?" in err.issues[1].message


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("dep_id", "suggestion"),
    [("Qwen", "qwen"), ("my model", "my-model"), ("-qwen", "qwen"), ("qwen/2", "qwen-2")],
)
def test_id_that_is_not_url_safe_is_refused_with_a_suggestion(dep_id: str, suggestion: str) -> None:
    err = problems(f'deployments:\n  "{dep_id}":\n    model: m\n')
    issue = only_issue(err, f"deployments.{dep_id}", 2)
    assert f"`{dep_id}` is not URL-safe" in issue.message
    assert f"(for example `{suggestion}`)" in issue.message


def test_id_longer_than_63_characters_is_refused_saying_why() -> None:
    long_id = "a" * 64
    issue = only_issue(
        problems(f"deployments:\n  {long_id}:\n    model: m\n"), f"deployments.{long_id}", 2
    )
    assert "at most 63" in issue.message


@pytest.mark.parametrize("dep_id", ["v1", "openai", "health", "metrics", "fleet"])
def test_id_reserved_by_the_gateway_is_refused(dep_id: str) -> None:
    issue = only_issue(
        problems(f"deployments:\n  {dep_id}:\n    model: m\n"), f"deployments.{dep_id}", 2
    )
    assert f"`{dep_id}` is reserved by the gateway" in issue.message
    assert "pick another id" in issue.message


@pytest.mark.parametrize("dep_id", ["qwen", "qwen2.5", "llama_3-8b", "0day", "a" * 63])
def test_url_safe_ids_are_accepted(dep_id: str) -> None:
    assert list(load(f"deployments:\n  {dep_id}:\n    model: m\n").deployments) == [dep_id]


def test_deployment_written_twice_is_refused_not_silently_replaced() -> None:
    err = problems(
        """
        deployments:
          qwen:
            model: Qwen/Qwen2.5-1.5B-Instruct
          qwen:
            model: Qwen/Qwen2.5-7B-Instruct
        """
    )
    issue = only_issue(err, "deployments.qwen", 5)
    assert "written twice (lines 3 and 5)" in issue.message


# ---------------------------------------------------------------- ports


def test_two_deployments_on_one_port_is_refused_at_the_second() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m1
            listen: tcp
            port: 8000
          b:
            model: m2
            listen: tcp
            port: 8000
        """
    )
    issue = only_issue(err, "deployments.b.port", 10)
    assert "port 8000 is already taken by deployment `a`" in issue.message
    assert "leave `port` out to have one chosen" in issue.message


def test_deployment_on_the_gateway_port_is_refused() -> None:
    err = problems(
        "gateway:\n  port: 9000\ndeployments:\n  a:\n    model: m\n"
        "    listen: tcp\n    port: 9000\n"
    )
    issue = only_issue(err, "deployments.a.port", 7)
    assert "already taken by the gateway (gateway.port)" in issue.message


def test_replicas_take_consecutive_ports_and_clash_with_a_later_port() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m1
            listen: tcp
            port: 8000
            replicas: 3
          b:
            model: m2
            listen: tcp
            port: 8002
        """
    )
    issue = only_issue(err, "deployments.b.port", 11)
    assert "port 8002 is already taken by deployment `a` replica 2" in issue.message


def test_replica_ports_reaching_the_gateway_port_are_refused() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    listen: tcp\n    port: 8079\n    replicas: 2\n"
    )
    issue = only_issue(err, "deployments.a.port", 5)
    assert "port 8080 is already taken by the gateway" in issue.message


def test_replica_port_past_65535_is_refused() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    listen: tcp\n    port: 65535\n    replicas: 2\n"
    )
    issue = only_issue(err, "deployments.a.port", 5)
    assert "replica 1 would get port 65536, past 65535; lower `port`" in issue.message


def test_a_deployment_port_inside_the_vllm_port_ranges_is_refused() -> None:
    # Engines a-0, a-1, b-0 take VLLM_PORT ranges 20000-20099, 20100-20199, 20200-20299.
    err = problems(
        """
        deployments:
          a:
            model: m1
            replicas: 2
          b:
            model: m2
            listen: tcp
            port: 20150
        """
    )
    issue = only_issue(err, "deployments.b.port", 9)
    assert issue.message == (
        "port 20150 lies in 20100-20199, the range of vLLM's internal ports (VLLM_PORT) of "
        "engine `a-1`; the engines' ranges take 20000-20299 (engines.vllm_port_base, "
        "vllm_port_span): pick a port outside them, or move them with engines.vllm_port_base"
    )


def test_the_gateway_and_base_port_inside_the_vllm_port_ranges_are_refused() -> None:
    err = problems(
        """
        gateway: {port: 30005}
        engines: {base_port: 30050, vllm_port_base: 30000}
        deployments: {a: {model: m}}
        """
    )
    assert places(err) == ["gateway.port", "engines.base_port"]
    assert "port 30005 lies in 30000-30099" in err.issues[0].message
    assert "port 30050 lies in 30000-30099" in err.issues[1].message


def test_vllm_port_ranges_past_65535_are_refused() -> None:
    err = problems("engines: {vllm_port_base: 65500}\ndeployments: {a: {model: m}}\n")
    issue = only_issue(err, "engines.vllm_port_base", 1)
    assert "the VLLM_PORT ranges of 1 engine(s), 100 ports each from 65500, run past 65535" in (
        issue.message
    )


def test_a_vllm_port_in_env_that_is_not_a_port_is_refused() -> None:
    err = problems("deployments:\n  a:\n    model: m\n    env: {VLLM_PORT: tcp://x:1}\n")
    issue = only_issue(err, "deployments.a.env.VLLM_PORT", 4)
    assert "VLLM_PORT 'tcp://x:1' is not a port number" in issue.message


def test_a_remote_deployment_with_a_stall_timeout_is_refused() -> None:
    err = problems(
        "deployments:\n  r:\n    model: m\n    endpoints: [http://10.0.0.1:8000]\n"
        "    stall_timeout: 10\n"
    )
    issue = only_issue(err, "deployments.r.stall_timeout", 5)
    assert "remove `stall_timeout`" in issue.message


@pytest.mark.parametrize("port", ["0", "65536", "true", "http"])
def test_port_out_of_range_or_not_a_number_is_refused(port: str) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    port: {port}\n")
    only_issue(err, "deployments.a.port", 4)


# ---------------------------------------------------------------- GPUs


def two_on_gpu_0(a_extra: str = "", b_extra: str = "") -> str:
    return (
        "deployments:\n"
        f"  a:\n    model: m1\n    gpus: [0]\n{a_extra}"
        f"  b:\n    model: m2\n    gpus: [1, 0]\n{b_extra}"
    )


SHARE = "    share_gpus: true\n"


def util(value: str) -> str:
    return f'    args: ["--gpu-memory-utilization", "{value}"]\n'


def test_two_deployments_on_one_gpu_is_refused_at_the_second_with_the_fix() -> None:
    text = two_on_gpu_0()
    issue = only_issue(problems(text), "deployments.b.gpus[1]", 7)
    assert "GPU 0 is already used by deployment `a`" in issue.message
    assert "set `share_gpus: true` and `--gpu-memory-utilization`" in issue.message


@pytest.mark.parametrize(
    ("a_extra", "b_extra"),
    [
        (SHARE + util("0.45"), SHARE + util("0.45")),
        (util("0.45"), util("0.5")),  # the flag alone says it shares
        (util("0.45"), '    args: ["--gpu_memory_utilization=0.5"]\n'),  # as vLLM reads it
        (SHARE + util("0.3"), util("0.6")),
    ],
)
def test_a_gpu_is_shared_when_both_deployments_say_so(a_extra: str, b_extra: str) -> None:
    cfg = load(two_on_gpu_0(a_extra, b_extra))
    assert cfg.deployments["a"].gpus == [0] and cfg.deployments["b"].gpus == [1, 0]


@pytest.mark.parametrize(
    ("a_extra", "b_extra", "line"),
    [
        (SHARE + util("0.45"), "", 9),  # only the first shares
        ("", SHARE + util("0.45"), 7),  # only the second shares
    ],
)
def test_sharing_a_gpu_needs_both_deployments_to_say_so(
    a_extra: str, b_extra: str, line: int
) -> None:
    issue = only_issue(problems(two_on_gpu_0(a_extra, b_extra)), "deployments.b.gpus[1]", line)
    assert "GPU 0 is already used by deployment `a`" in issue.message


def test_a_third_deployment_that_does_not_share_is_refused() -> None:
    text = two_on_gpu_0(util("0.3"), util("0.3")) + "  c:\n    model: m3\n    gpus: [0]\n"
    issue = only_issue(problems(text), "deployments.c.gpus[0]", 12)
    assert "GPU 0 is already used by deployment `a`" in issue.message


def test_shared_gpu_whose_memory_fractions_exceed_the_card_is_refused() -> None:
    issue = only_issue(problems(two_on_gpu_0(util("0.5"), util("0.6"))), "deployments.b.gpus[1]", 8)
    assert "GPU 0 is shared by `a`, `b`" in issue.message
    assert "add up to 1.10" in issue.message
    assert "at most 1" in issue.message


def test_share_gpus_without_a_memory_fraction_is_refused_naming_vllm_default() -> None:
    # vLLM takes 0.92 of the card by default; two such engines cannot fit.
    issue = only_issue(problems(two_on_gpu_0(SHARE, SHARE)), "deployments.b.gpus[1]", 8)
    assert "add up to 1.84" in issue.message
    assert "without the flag takes 0.92" in issue.message


@pytest.mark.parametrize("value", ["abc", "0", "1.5"])
def test_memory_fraction_that_is_not_a_fraction_is_refused(value: str) -> None:
    err = problems(
        f'deployments:\n  a:\n    model: m\n    args: ["--gpu-memory-utilization={value}"]\n'
    )
    issue = only_issue(err, "deployments.a.args", 4)
    assert "above 0 and at most 1" in issue.message


def test_gpu_listed_twice_in_one_deployment_is_one_problem() -> None:
    issue = only_issue(
        problems("deployments:\n  a:\n    model: m\n    gpus: [0, 0]\n"), "deployments.a.gpus", 4
    )
    assert issue.message == "a GPU index is listed twice"


def test_gpus_is_a_list_or_a_count() -> None:
    assert load("deployments:\n  a:\n    model: m\n    gpus: [0, 3]\n").deployments["a"].gpus == [
        0,
        3,
    ]
    assert load("deployments:\n  a:\n    model: m\n    gpus: 2\n").deployments["a"].gpus == 2
    # a count may come from the environment, as text
    loaded = load("deployments:\n  a:\n    model: m\n    gpus: ${N}\n", {"N": "4"})
    assert loaded.deployments["a"].gpus == 4


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("0", "deployments.a.gpus"),
        ("true", "deployments.a.gpus"),
        ("[true]", "deployments.a.gpus"),
        ('"0,1"', "deployments.a.gpus"),
        ("1.5", "deployments.a.gpus"),
        ("[-1]", "deployments.a.gpus[0]"),
        ("[0, x]", "deployments.a.gpus[1]"),
    ],
)
def test_gpus_that_is_neither_is_one_problem_with_the_fix(value: str, where: str) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    gpus: {value}\n")
    issue = only_issue(err, where, 4)
    assert "`gpus` is a list of GPU indices (`[0, 1]`) or a count (`2`)" in issue.message


def test_empty_gpu_list_is_refused() -> None:
    issue = only_issue(
        problems("deployments:\n  a:\n    model: m\n    gpus: []\n"), "deployments.a.gpus", 4
    )
    assert "remove `gpus`" in issue.message


def test_cuda_visible_devices_in_env_and_gpus_is_refused() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    gpus: [0]\n    env: {CUDA_VISIBLE_DEVICES: '1'}\n"
    )
    issue = only_issue(err, "deployments.a.env.CUDA_VISIBLE_DEVICES", 5)
    assert "remove one of the two" in issue.message


def test_replicas_must_split_a_gpu_list_evenly() -> None:
    err = problems("deployments:\n  a:\n    model: m\n    gpus: [0, 1, 2]\n    replicas: 2\n")
    issue = only_issue(err, "deployments.a.gpus", 4)
    assert "3 GPUs cannot be split evenly over 2 replicas" in issue.message
    assert "list a multiple of 2 GPUs" in issue.message


@pytest.mark.parametrize("replicas", ["0", "65", "true"])
def test_replicas_out_of_range_is_refused(replicas: str) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    replicas: {replicas}\n")
    only_issue(err, "deployments.a.replicas", 4)


# ---------------------------------------------------------------- parallelism vs GPUs


@pytest.mark.parametrize(
    ("gpus", "replicas", "args"),
    [
        ("[0, 1]", 1, '["--tensor-parallel-size", "2"]'),
        ("[0, 1]", 1, '["-tp=2"]'),
        ("[0, 1, 2, 3]", 2, '["--tensor-parallel-size", 2]'),
        ("[0, 1, 2, 3]", 1, '["-tp", "2", "--pipeline-parallel-size", "2"]'),
        ("2", 2, '["--tensor-parallel-size", "2"]'),  # a count is per replica
        ("[0, 1]", 1, '["--data-parallel-size", "2"]'),
        ("[0, 1, 2, 3]", 1, '["-dp", "2", "--tensor_parallel_size", "2"]'),
    ],
)
def test_parallel_sizes_matching_the_gpus_are_accepted(gpus: str, replicas: int, args: str) -> None:
    text = f"deployments:\n  a:\n    model: m\n    gpus: {gpus}\n    replicas: {replicas}\n"
    cfg = load(text + f"    args: {args}\n")
    assert cfg.deployments["a"].replicas == replicas


def test_tensor_parallel_size_not_matching_the_gpus_is_refused() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    gpus: [0]\n"
        '    args: ["--tensor-parallel-size", "2"]\n'
    )
    issue = only_issue(err, "deployments.a.gpus", 4)
    assert "each replica gets 1 GPU(s) but the engine args ask for 2" in issue.message
    assert "make them match" in issue.message


def test_data_parallel_size_counts_in_the_gpus_an_engine_needs() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    gpus: [0, 1]\n"
        '    args: ["-tp", "2", "--data-parallel-size=2"]\n'
    )
    issue = only_issue(err, "deployments.a.gpus", 4)
    assert "ask for 4 (tensor-parallel 2 × pipeline-parallel 1 × data-parallel 2)" in issue.message


def test_tensor_parallel_size_that_is_not_a_number_is_refused() -> None:
    err = problems('deployments:\n  a:\n    model: m\n    gpus: [0]\n    args: ["-tp", "two"]\n')
    issue = only_issue(err, "deployments.a.args", 5)
    assert "must be integers" in issue.message


# ---------------------------------------------------------------- names clients send


def test_alias_that_is_another_deployments_id_is_refused_at_the_alias() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m1
            aliases: [x, b]
          b:
            model: m2
        """
    )
    issue = only_issue(err, "deployments.a.aliases[1]", 5)
    assert "alias `b` is already the id of deployment `b`" in issue.message
    assert "pick another alias" in issue.message


def test_alias_that_is_another_deployments_model_code_is_refused_at_the_alias() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m1
            aliases: [m2]
          b:
            model: m2
        """
    )
    issue = only_issue(err, "deployments.a.aliases[0]", 5)
    assert "alias `m2` is already the model code of deployment `b`" in issue.message


def test_alias_used_by_two_deployments_is_refused_at_the_second() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m1\n    aliases: [x]\n"
        "  b:\n    model: m2\n    aliases: [y, x]\n"
    )
    issue = only_issue(err, "deployments.b.aliases[1]", 7)
    assert "alias `x` is already the alias of deployment `a`" in issue.message


def test_alias_of_a_remote_deployment_is_checked_too() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m1\n    endpoints: ['http://h:1']\n    aliases: [b]\n"
        "  b:\n    model: m2\n"
    )
    only_issue(err, "deployments.a.aliases[0]", 5)


def test_model_code_that_is_another_deployments_id_is_refused() -> None:
    err = problems("deployments:\n  qwen:\n    model: m1\n  b:\n    model: qwen\n")
    issue = only_issue(err, "deployments.b.model", 5)
    assert "model code `qwen` is also the id of deployment `qwen`; rename that id" in issue.message


def test_names_a_deployment_already_has_and_a_shared_model_code_are_fine() -> None:
    cfg = load(
        """
        deployments:
          a:
            model: m1
            aliases: [a, m1, short]
          b:
            model: m1
            args: [--enforce-eager]
        """
    )
    assert served_names("a", cfg.deployments["a"]) == ["m1", "a", "short"]


def test_served_name_is_a_name_clients_use_and_may_not_clash() -> None:
    cfg = load(
        """
        deployments:
          a:
            model: ./models/m1
            served_name: org/m1
        """
    )
    assert cfg.deployments["a"].served_as == "org/m1"
    assert served_names("a", cfg.deployments["a"]) == ["org/m1", "./models/m1", "a"]
    err = problems(
        """
        deployments:
          a:
            model: m1
          b:
            model: m2
            served_name: a
        """
    )
    issue = only_issue(err, "deployments.b.served_name", 7)
    assert "served name `a` is already the id of deployment `a`" in issue.message


# ---------------------------------------------------------------- flags the fleet owns


@pytest.mark.parametrize(
    ("args", "index", "flag", "fix"),
    [
        ('["--enforce-eager", "--host", "0.0.0.0"]', 1, "--host", "set `host:`"),
        ('["--port=9000"]', 0, "--port", "set `port:`"),
        ('["--served-model-name", "x"]', 0, "--served-model-name", "add extra names to `aliases:`"),
        ('["--uds", "/tmp/x.sock"]', 0, "--uds", "engines.socket_dir"),
        # vLLM reads `--served_model_name` as `--served-model-name`
        ('["--enforce-eager", "--served_model_name=x"]', 1, "--served-model-name", "`aliases:`"),
    ],
)
def test_flags_the_fleet_sets_are_refused_in_args(
    args: str, index: int, flag: str, fix: str
) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    args: {args}\n")
    issue = only_issue(err, f"deployments.a.args[{index}]", 4)
    assert f"`{flag}` is set by the fleet" in issue.message and fix in issue.message


def test_unknown_placeholder_in_a_command_is_refused() -> None:
    err = problems(
        'engine_command: [vllm, serve, "{model}", "--x={gpu}"]\ndeployments: {a: {model: m}}\n'
    )
    issue = only_issue(err, "engine_command[3]", 1)
    assert "unknown placeholder `{gpu}`" in issue.message
    assert "{model}, {host}, {port}, {uds}, {python}, {id}" in issue.message


def test_empty_command_is_refused() -> None:
    err = problems("deployments:\n  a:\n    model: m\n    command: []\n")
    issue = only_issue(err, "deployments.a.command", 4)
    assert "the command is empty" in issue.message


# ---------------------------------------------------------------- listen: uds | tcp


def test_engines_listen_on_a_unix_socket_by_default() -> None:
    cfg = load("deployments:\n  a:\n    model: m\n")
    assert cfg.deployments["a"].listen == "uds"
    assert (cfg.engines.socket_dir, cfg.engines.socket_group) == (".fleet/sockets", None)


def test_a_command_placing_the_port_but_not_the_socket_is_refused_with_the_fixes() -> None:
    err = problems(
        'deployments:\n  a:\n    model: m\n    command: [my-server, "{model}", --port, "{port}"]\n'
    )
    issue = only_issue(err, "deployments.a.command", 4)
    assert "listens on a Unix socket (the default, `listen: uds`)" in issue.message
    assert "places `{port}` and not `{uds}`" in issue.message
    assert "add `{uds}`" in issue.message and "set `listen: tcp`" in issue.message


def test_the_shared_engine_command_placing_host_names_the_engine_command() -> None:
    err = problems(
        'engine_command: [srv, "{model}", --bind, "{host}"]\ndeployments:\n  a: {model: m}\n'
    )
    issue = only_issue(err, "engine_command", 1)
    assert "deployment `a`" in issue.message and "`{host}`" in issue.message


def test_a_command_placing_the_socket_or_nothing_is_fine_on_a_socket() -> None:
    load('deployments:\n  a:\n    model: m\n    command: [srv, "{model}", --sock, "{uds}"]\n')
    load('deployments:\n  a:\n    model: m\n    command: [srv, "{model}"]\n')


def test_listen_tcp_with_the_socket_placeholder_is_refused() -> None:
    err = problems(
        "deployments:\n  a:\n    model: m\n    listen: tcp\n"
        '    command: [srv, "{model}", --uds, "{uds}"]\n'
    )
    issue = only_issue(err, "deployments.a.listen", 4)
    assert "remove `{uds}`" in issue.message


@pytest.mark.parametrize("key", ["port: 9000", "host: 0.0.0.0"])
def test_a_port_or_host_on_a_socket_engine_is_refused(key: str) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    {key}\n")
    name = key.split(":")[0]
    issue = only_issue(err, f"deployments.a.{name}", 4)
    assert f"remove `{name}`, or set `listen: tcp`" in issue.message


def test_listen_is_uds_or_tcp_and_not_for_remote_endpoints() -> None:
    only_issue(
        problems("deployments:\n  a:\n    model: m\n    listen: unix\n"), "deployments.a.listen", 4
    )
    err = problems(
        "deployments:\n  r:\n    model: m\n    endpoints: [http://10.0.0.1:8000]\n    listen: tcp\n"
    )
    assert "remove `listen`" in only_issue(err, "deployments.r.listen", 5).message


# ---------------------------------------------------------------- remote endpoints


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gpus", "[0]"),
        ("share_gpus", "true"),
        ("args", "[--enforce-eager]"),
        ("env", "{A: b}"),
        ("host", "0.0.0.0"),
        ("port", "8000"),
        ("command", "[python]"),
        ("start_timeout", "5"),
        ("replicas", "2"),
    ],
)
def test_remote_deployment_refuses_keys_for_engines_the_fleet_starts(key: str, value: str) -> None:
    err = problems(
        f"deployments:\n  r:\n    model: m\n    endpoints: ['http://10.0.0.1:8000']\n"
        f"    {key}: {value}\n"
    )
    issue = only_issue(err, f"deployments.r.{key}", 5)
    assert f"remove `{key}`" in issue.message


def test_empty_endpoints_is_refused_rather_than_starting_the_engine_here() -> None:
    err = problems("deployments:\n  r:\n    model: m\n    endpoints: []\n")
    issue = only_issue(err, "deployments.r.endpoints", 4)
    assert "`endpoints` is empty" in issue.message and "remove `endpoints`" in issue.message


def test_remote_endpoint_that_is_not_a_url_is_refused() -> None:
    err = problems("deployments:\n  r:\n    model: m\n    endpoints: ['10.0.0.1:8000']\n")
    issue = only_issue(err, "deployments.r.endpoints", 4)
    assert "write it like http://10.1.2.3:8000" in issue.message


# ---------------------------------------------------------------- ${VAR}


def test_unset_variable_without_default_is_refused_once_with_the_fix() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m
            env: {HF_TOKEN: "${HF_TOKEN}"}
            port: ${PORT}
        """
    )
    assert places(err) == ["deployments.a.env.HF_TOKEN", "deployments.a.port"]
    assert [i.line for i in err.issues] == [5, 6]
    assert "environment variable HF_TOKEN is not set" in err.issues[0].message
    assert "${HF_TOKEN:-default}" in err.issues[0].message
    # no second complaint that the (empty) port is not a number
    assert "integer" not in err.render()


@pytest.mark.parametrize(
    ("written", "environ", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A}", {"A": ""}, ""),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A:-dflt}", {"A": "x"}, "x"),
        ("${A:-}", {}, ""),
        ("${A-dflt}", {}, "dflt"),
        ("${A-dflt}", {"A": ""}, ""),
        ("pre-${A}-${B:-b}", {"A": "a"}, "pre-a-b"),
        ("$$", {}, "$"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("${A:-p$$w}", {}, "p$w"),
        ("$A", {"A": "x"}, "$A"),  # only the braced form expands
    ],
)
def test_variable_expansion(written: str, environ: dict[str, str], expected: str) -> None:
    cfg = load(f"deployments:\n  a:\n    model: m\n    env: {{V: '{written}'}}\n", environ)
    assert cfg.deployments["a"].env == {"V": expected}


def test_expanded_default_becomes_a_number_where_one_is_needed() -> None:
    cfg = load("deployments:\n  a:\n    model: m\n    listen: tcp\n    port: ${PORT:-8001}\n")
    assert cfg.deployments["a"].port == 8001


@pytest.mark.parametrize("written", ["${1A}", "${A:?required}", "${A", "${A:-${B}}"])
def test_malformed_variable_reference_is_refused(written: str) -> None:
    err = problems(f"deployments:\n  a:\n    model: m\n    args: ['{written}']\n")
    issue = only_issue(err, "deployments.a.args[0]", 4)
    assert "is not a valid variable reference" in issue.message
    assert "${NAME:-default}" in issue.message


def test_keys_are_not_expanded() -> None:
    cfg = load("deployments:\n  a:\n    model: m\n    env: {'${A}': x}\n", {"A": "B"})
    assert cfg.deployments["a"].env == {"${A}": "x"}


# ---------------------------------------------------------------- YAML values


def test_numbers_in_args_env_and_command_become_strings() -> None:
    cfg = load(
        """
        engine_command: [vllm, serve, "{model}", --seed, 7]
        deployments:
          a:
            model: m
            args: [--max-model-len, 2048, --gpu-memory-utilization, 0.5]
            env: {OMP_NUM_THREADS: 4}
        """
    )
    assert cfg.engine_command == ["vllm", "serve", "{model}", "--seed", "7"]
    dep = cfg.deployments["a"]
    assert dep.args == ["--max-model-len", "2048", "--gpu-memory-utilization", "0.5"]
    assert dep.env == {"OMP_NUM_THREADS": "4"}


def test_numbers_reach_the_engine_as_written_not_as_yaml_reads_them() -> None:
    # YAML 1.1 reads 1.10 as 1.1, 010 as 8 and 0x10 as 16; the engine gets the file's text.
    cfg = load(
        """
        engine_command: [vllm, serve, "{model}", --seed, 010]
        deployments:
          a:
            model: m
            args: [--gpu-memory-utilization, 0.90, --revision, 0123]
            env: {SOME_VERSION: 1.10, MASK: 0x10}
            listen: tcp
            port: 8001
        """
    )
    assert cfg.engine_command[-1] == "010"
    dep = cfg.deployments["a"]
    assert dep.args == ["--gpu-memory-utilization", "0.90", "--revision", "0123"]
    assert dep.env == {"SOME_VERSION": "1.10", "MASK": "0x10"}
    assert dep.port == 8001  # numbers stay numbers where a number is meant


@pytest.mark.parametrize("value", ["false", "yes", "", "null"])
def test_yes_no_or_empty_env_value_is_refused_with_quote_hint(value: str) -> None:
    err = problems(
        f"deployments:\n  a:\n    model: m\n    env:\n      TOKENIZERS_PARALLELISM: {value}\n"
    )
    issue = only_issue(err, "deployments.a.env.TOKENIZERS_PARALLELISM", 5)
    assert "quote it" in issue.message


# ---------------------------------------------------------------- the file itself


def test_missing_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert info.value.render() == f"{path}: 1 problem(s) in the fleet file\n" + (
        "  (top level): file not found; check the path"
    )


def test_invalid_yaml_names_the_line() -> None:
    err = problems(
        """
        deployments:
          a:
            model: m
            args: [--enforce-eager
          b:
            model: m2
        """
    )
    assert len(err.issues) == 1
    assert err.issues[0].message.startswith("not valid YAML:")
    assert err.issues[0].line == 6
    assert "line 6, (top level): not valid YAML" in err.render()


def test_tab_indentation_names_the_line() -> None:
    err = problems("deployments:\n  a:\n\tmodel: m\n")
    assert err.issues[0].line == 3 and "not valid YAML" in err.issues[0].message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_file_asks_for_deployments(text: str) -> None:
    err = problems(text)
    assert places(err) == ["deployments"]
    assert "add at least one deployment" in err.issues[0].message


def test_empty_deployments_mapping_is_refused() -> None:
    err = problems("deployments: {}\n")
    only_issue(err, "deployments", 1)


def test_file_that_is_not_a_mapping_is_refused() -> None:
    err = problems("- qwen\n- mistral\n")
    assert "must be a mapping with `deployments:`" in err.render()


def test_load_reads_the_file_and_resolves_log_dir_next_to_it(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("engines: {log_dir: logs}\ndeployments: {a: {model: m}}\n")
    cfg = config.load(path, environ={})
    assert cfg.source == str(path)
    assert cfg.log_dir() == tmp_path / "logs"
    path.write_text("engines: {log_dir: /var/log/fleet}\ndeployments: {a: {model: m}}\n")
    assert config.load(path, environ={}).log_dir() == Path("/var/log/fleet")


def test_load_reports_with_the_file_name_and_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "deployments:\n  a:\n    model: m\n    gpus: [0]\n  b:\n    model: n\n    gpus: [0]\n"
    )
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    rendered = info.value.render()
    assert rendered.startswith(f"{path}: 1 problem(s) in the fleet file\n")
    assert "  line 7, deployments.b.gpus[0]: GPU 0 is already used by deployment `a`" in rendered


# ---------------------------------------------------------------- all problems at once


def test_render_lists_every_problem_not_just_the_first() -> None:
    err = problems(
        """
        gateway:
          port: 8000
        deployments:
          Qwen:
            model: Qwen/Qwen2.5-1.5B-Instruct
            gpus: [0]
            listen: tcp
            port: 8000
            args: ["--host", "0.0.0.0"]
          mistral:
            model: mistralai/Mistral-Small-3.1-24B-Instruct-2503
            gpus: [0, 1]
            env: {HF_TOKEN: "${HF_TOKEN}"}
        """
    )
    rendered = err.render()
    assert rendered.splitlines()[0] == "<string>: 5 problem(s) in the fleet file"
    assert rendered.splitlines()[1:] == [
        f"  line {issue.line}, {issue.where()}: {issue.message}" for issue in err.issues
    ]
    assert [(i.where(), i.line) for i in err.issues] == [
        ("deployments.mistral.env.HF_TOKEN", 14),
        ("deployments.Qwen", 5),
        ("deployments.Qwen.args[0]", 10),
        ("deployments.Qwen.port", 9),
        ("deployments.mistral.gpus[0]", 13),
    ]
    assert str(err) == rendered


def test_flag_value_reads_both_spellings_and_the_last_wins() -> None:
    args = ["--tensor-parallel-size", "2", "--x", "-tp=4"]
    assert flags.flag_value(args, "--tensor-parallel-size", "-tp") == "4"
    assert flags.flag_value(["--a=1=2"], "--a") == "1=2"
    assert flags.flag_value(["--a"], "--a") is None
    assert flags.flag_value(["--ab", "1"], "--a") is None
    assert flags.flag_value(["--tensor_parallel_size", "2"], "--tensor-parallel-size") == "2"
    assert flags.flag_value(["-t_p", "2"], "-tp") is None  # only long flags are rewritten


@pytest.mark.parametrize(
    ("text", "where", "line", "read_as"),
    [
        ("deployments:\n  7:\n    model: m\n", "deployments.7", 2, "7"),
        ("deployments:\n  a:\n    model: m\n    env:\n      1: x\n", "deployments.a.env.1", 5, "1"),
        ("deployments:\n  yes:\n    model: m\n", "deployments.True", 1, "True"),
    ],
)
def test_key_that_yaml_reads_as_a_number_or_yes_no_is_refused_asking_to_quote(
    text: str, where: str, line: int, read_as: str
) -> None:
    issue = only_issue(problems(text), where, line)
    assert f"this key is read by YAML as {read_as}, not as text; quote it" in issue.message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("gateway: {port: yes}\n", "gateway.port"),
        ("engines: {max_restarts: on}\n", "engines.max_restarts"),
        ("engines: {drain_timeout: true}\n", "engines.drain_timeout"),
    ],
)
def test_yes_or_no_where_a_number_belongs_is_refused_in_gateway_and_engines(
    text: str, where: str
) -> None:
    issue = only_issue(problems(text + "deployments: {a: {model: m}}\n"), where, 1)
    assert "yes/no value where a number is expected" in issue.message
