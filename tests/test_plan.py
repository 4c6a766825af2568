"""The plan: a fleet file (+ the machine's GPUs) becomes the exact engines to start."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vllm_fleet import config
from vllm_fleet.config import ConfigError, FleetConfig
from vllm_fleet.gpus import Gpu, Inventory, parse_query_gpu
from vllm_fleet.plan import EngineSpec, Plan, RemoteSpec, build_plan

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed-two-models.yaml"
H200 = Path(__file__).resolve().parent / "fixtures" / "nvidia-smi-h200" / "query-gpu.csv"
PY = "/opt/py/bin/python3"
NO_INVENTORY = Inventory(None, "nvidia-smi not found")


def gpus(*indices: int) -> Inventory:
    return Inventory(tuple(Gpu(i, f"GPU-{i}", "NVIDIA H100", 81559, 0, 81000) for i in indices))


def cfg(text: str, environ: dict[str, str] | None = None) -> FleetConfig:
    return config.loads(textwrap.dedent(text), environ=environ or {})


def plan(text: str, inventory: Inventory = NO_INVENTORY) -> Plan:
    return build_plan(cfg(text), inventory, PY)


def plan_error(text: str, inventory: Inventory = NO_INVENTORY) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        plan(text, inventory)
    return info.value


def engine(p: Plan, name: str) -> EngineSpec:
    (found,) = [e for e in p.engines if e.name == name]
    return found


# ---------------------------------------------------------------- the seed example


def test_seed_example_plans_exactly_the_two_vllm_serve_commands() -> None:
    p = build_plan(config.load(SEED, environ={}), NO_INVENTORY, PY)
    assert [e.name for e in p.engines] == ["qwen-0", "mistral-0"]
    assert p.remotes == ()
    qwen, mistral = p.engines
    sockets = SEED.parent / ".fleet" / "sockets"
    assert qwen.argv == (
        "vllm", "serve", "Qwen/Qwen2.5-1.5B-Instruct",
        "--uds", str(sockets / "qwen-0.sock"),
        "--served-model-name", "Qwen/Qwen2.5-1.5B-Instruct", "qwen", "qwen2.5",
        "--shutdown-timeout", "30",
        "--enforce-eager",
    )  # fmt: skip
    assert dict(qwen.env) == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "0",
        "VLLM_PORT": "20000",
    }
    # On a Unix socket in the fleet's private directory, on no TCP port.
    assert (qwen.gpus, qwen.port, qwen.uds) == ((0,), None, sockets / "qwen-0.sock")
    assert qwen.url == f"unix:{sockets / 'qwen-0.sock'}"
    assert mistral.argv == (
        "vllm", "serve", "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        "--uds", str(sockets / "mistral-0.sock"),
        "--served-model-name", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistral",
        "--shutdown-timeout", "30",
        "--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral",
        "--tool-call-parser", "mistral", "--enable-auto-tool-choice",
        "--limit-mm-per-prompt", '{"image":10}',
        "--tensor-parallel-size", "2",
    )  # fmt: skip
    assert dict(mistral.env) == {
        "HF_TOKEN": "",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1,2",
        "VLLM_PORT": "20100",
    }
    assert (mistral.gpus, mistral.uds) == ((1, 2), sockets / "mistral-0.sock")
    assert (qwen.vllm_ports, mistral.vllm_ports) == (range(20000, 20100), range(20100, 20200))
    assert qwen.stall_timeout == mistral.stall_timeout == 120.0  # `vllm serve`: watched
    logs = SEED.parent / ".fleet" / "logs"
    assert (qwen.log_path, mistral.log_path) == (logs / "qwen-0.log", logs / "mistral-0.log")
    assert qwen.served_names == ("Qwen/Qwen2.5-1.5B-Instruct", "qwen", "qwen2.5")


def test_seed_example_passes_hf_token_from_the_environment() -> None:
    p = build_plan(config.load(SEED, environ={"HF_TOKEN": "hf_x"}), gpus(0, 1, 2), PY)
    assert dict(engine(p, "mistral-0").env)["HF_TOKEN"] == "hf_x"


def test_seed_example_on_the_real_one_gpu_h200_names_the_missing_gpus() -> None:
    h200 = Inventory(tuple(parse_query_gpu(H200.read_text())))
    with pytest.raises(ConfigError) as info:
        build_plan(config.load(SEED, environ={}), h200, PY)
    assert [(i.where(), i.line) for i in info.value.issues] == [
        ("deployments.mistral.gpus[0]", 23),  # the line of `gpus: [1, 2]` in the seed file
        ("deployments.mistral.gpus[1]", 23),
    ]
    assert "this machine has no GPU 1 (it has: 0)" in info.value.issues[0].message
    assert "silently sees no GPU at all" in info.value.issues[0].message
    assert str(SEED) in info.value.render()


# ---------------------------------------------------------------- argv


def test_default_template_appends_host_port_names_then_args() -> None:
    p = plan(
        """
        deployments:
          a:
            model: org/m
            listen: tcp
            host: 10.0.0.5
            port: 9001
            aliases: [m, a]
            args: [--max-model-len, 4096, "{model}"]
        """
    )
    assert engine(p, "a-0").argv == (
        "vllm", "serve", "org/m", "--host", "10.0.0.5", "--port", "9001",
        "--served-model-name", "org/m", "a", "m",  # model code, id, aliases; no repeats
        "--shutdown-timeout", "30",
        "--max-model-len", "4096", "{model}",  # args pass through verbatim
    )  # fmt: skip


def test_template_placeholders_take_the_place_of_the_appended_flags() -> None:
    p = plan(
        """
        engine_command: ["{python}", -m, vllm.entrypoints.openai.api_server, --model, "{model}",
                         --host, "{host}", "--port={port}", --tag, "{id}"]
        deployments:
          a:
            model: org/m
            listen: tcp
            args: [--enforce-eager]
        """
    )
    assert engine(p, "a-0").argv == (
        PY, "-m", "vllm.entrypoints.openai.api_server", "--model", "org/m",
        "--host", "127.0.0.1", "--port=8100", "--tag", "a",
        "--served-model-name", "org/m", "a", "--shutdown-timeout", "30", "--enforce-eager",
    )  # fmt: skip


def test_template_with_only_port_gets_host_appended() -> None:
    p = plan(
        """
        engine_command: [vllm, serve, "{model}", --port, "{port}"]
        deployments:
          a: {model: m, listen: tcp}
        """
    )
    assert engine(p, "a-0").argv == (
        "vllm", "serve", "m", "--port", "8100", "--host", "127.0.0.1",
        "--served-model-name", "m", "a",
        "--shutdown-timeout", "30",
    )  # fmt: skip


def test_deployment_command_overrides_engine_command() -> None:
    p = plan(
        """
        engine_command: [never, used, "{model}"]
        deployments:
          a:
            model: m
            command: ["{python}", -m, vllm_fleet.testing.fake_vllm, "{model}"]
          b: {model: n}
        """
    )
    assert engine(p, "a-0").argv[:4] == (PY, "-m", "vllm_fleet.testing.fake_vllm", "m")
    assert engine(p, "b-0").argv[:3] == ("never", "used", "n")


# ---------------------------------------------------------------- env


def test_env_holds_the_deployments_env_and_cuda_visible_devices() -> None:
    p = plan(
        """
        deployments:
          a:
            model: m
            gpus: [3, 1]
            env: {VLLM_CPU_KVCACHE_SPACE: 1}
          b:
            model: n
        """
    )
    assert dict(engine(p, "a-0").env) == {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # indices as nvidia-smi numbers them
        "CUDA_VISIBLE_DEVICES": "3,1",
        "VLLM_PORT": "20000",
    }
    # no `gpus`: CUDA_VISIBLE_DEVICES left alone
    assert dict(engine(p, "b-0").env) == {"VLLM_PORT": "20100"}
    assert engine(p, "b-0").gpus is None


def test_accept_any_model_tells_every_engine_to_skip_name_validation() -> None:
    text = "gateway: {accept_any_model: true}\ndeployments: {a: {model: m}, b: {model: n}}\n"
    p = plan(text)
    assert [e.env.get("VLLM_SKIP_MODEL_NAME_VALIDATION") for e in p.engines] == ["1", "1"]
    plain = plan("deployments: {a: {model: m}}\n")
    assert "VLLM_SKIP_MODEL_NAME_VALIDATION" not in plain.engines[0].env


# ---------------------------------------------------------------- ports


def test_auto_ports_count_from_base_port_skipping_every_port_the_file_names() -> None:
    p = plan(
        """
        gateway: {port: 9001}
        engines: {base_port: 9000}
        deployments:
          a: {model: m1, listen: tcp}
          b: {model: m2, listen: tcp, port: 9002}
          c: {model: m3, listen: tcp, replicas: 2}
          u: {model: m5}
          d: {model: m4, listen: tcp, port: 9003}
        """
    )
    ports = {e.name: e.port for e in p.engines}
    # `u` is on a Unix socket (the default): it takes no port.
    assert ports == {"a-0": 9000, "b-0": 9002, "c-0": 9004, "c-1": 9005, "u-0": None, "d-0": 9003}


def test_auto_ports_past_65535_are_refused() -> None:
    err = plan_error(
        "engines: {base_port: 65535}\ndeployments: {a: {model: m, replicas: 2, listen: tcp}}\n"
    )
    assert [i.where() for i in err.issues] == ["engines.base_port"]
    assert "counting up from 65535 passes 65535; lower `base_port`" in err.issues[0].message


# ---------------------------------------------------------------- replicas


def test_replicas_get_consecutive_ports_and_equal_shares_of_the_gpu_list(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "deployments:\n  a:\n    model: m\n    listen: tcp\n    port: 8000\n    replicas: 2\n"
        "    gpus: [0, 1, 2, 3]\n    args: [-tp, 2]\n"
    )
    p = build_plan(config.load(path, environ={}), gpus(0, 1, 2, 3), PY)
    a0, a1 = p.engines
    assert (a0.name, a0.port, a0.gpus, a0.env["CUDA_VISIBLE_DEVICES"]) == (
        "a-0",
        8000,
        (0, 1),
        "0,1",
    )
    assert (a1.name, a1.port, a1.gpus, a1.env["CUDA_VISIBLE_DEVICES"]) == (
        "a-1",
        8001,
        (2, 3),
        "2,3",
    )
    assert a1.argv[a1.argv.index("--port") + 1] == "8001"
    assert (a0.log_path, a1.log_path) == (
        tmp_path / ".fleet" / "logs" / "a-0.log",
        tmp_path / ".fleet" / "logs" / "a-1.log",
    )
    assert [e.name for e in p.for_deployment("a")] == ["a-0", "a-1"]


# ---------------------------------------------------------------- GPU counts


def test_gpu_count_is_filled_from_the_inventory_without_overlap() -> None:
    p = plan(
        """
        deployments:
          b: {model: n, gpus: 2}
          a: {model: m, gpus: [1]}
          c: {model: o, gpus: 1, replicas: 2}
        """,
        gpus(0, 1, 2, 3, 4, 5),
    )
    assigned = {e.name: e.gpus for e in p.engines}
    # listed GPUs are kept first; counts take the lowest free ones in file order
    assert assigned == {"b-0": (0, 2), "a-0": (1,), "c-0": (3,), "c-1": (4,)}
    assert engine(p, "b-0").env["CUDA_VISIBLE_DEVICES"] == "0,2"


def test_gpu_count_larger_than_what_is_left_is_refused() -> None:
    err = plan_error(
        "deployments:\n  a: {model: m, gpus: [0]}\n  b: {model: n, gpus: 2}\n", gpus(0, 1)
    )
    assert [i.where() for i in err.issues] == ["deployments.b.gpus"]
    assert "replica 0 needs 2 GPU(s) but only 1 are left unassigned" in err.issues[0].message
    assert "(GPUs 0, 1)" in err.issues[0].message


def test_gpu_count_without_an_inventory_is_refused_saying_why() -> None:
    err = plan_error("deployments:\n  a: {model: m, gpus: 1}\n")
    assert [(i.where(), i.line) for i in err.issues] == [("deployments.a.gpus", 2)]
    message = err.issues[0].message
    assert "needs the machine's GPU inventory (nvidia-smi not found)" in message
    assert "e.g. `gpus: [0, 1]`" in message


def test_gpu_index_the_machine_lacks_is_refused_with_what_it_has() -> None:
    err = plan_error("deployments:\n  a: {model: m, gpus: [0, 5]}\n", gpus(0, 1))
    assert [i.where() for i in err.issues] == ["deployments.a.gpus[1]"]
    assert "this machine has no GPU 5 (it has: 0, 1)" in err.issues[0].message


def test_without_inventory_listed_gpus_are_trusted() -> None:
    p = plan("deployments:\n  a: {model: m, gpus: [7]}\n")
    assert p.engines[0].gpus == (7,)
    assert p.inventory is NO_INVENTORY


def test_unpinned_engines_on_a_gpu_machine_get_a_warning() -> None:
    text = "deployments: {a: {model: m}, b: {model: n}}\n"
    (warning,) = plan(text, gpus(0, 1)).warnings
    assert "engines a-0, b-0 set no `gpus`" in warning
    assert plan(text).warnings == ()  # no inventory: nothing to say


# ---------------------------------------------------------------- remote and misc


def test_remote_endpoints_become_remote_specs_and_start_nothing() -> None:
    p = plan(
        """
        deployments:
          local: {model: m, listen: tcp}
          remote:
            model: meta-llama/Llama-3.1-8B-Instruct
            endpoints: ["http://10.1.2.3:8000", "http://10.1.2.4:8000/"]
        """
    )
    assert [e.name for e in p.engines] == ["local-0"]
    assert p.remotes == (
        RemoteSpec("remote", 0, "http://10.1.2.3:8000"),
        RemoteSpec("remote", 1, "http://10.1.2.4:8000"),
    )
    assert [r.name for r in p.for_deployment("remote")] == ["remote-0", "remote-1"]
    assert engine(p, "local-0").port == 8100


def test_start_timeout_per_deployment_overrides_the_default() -> None:
    p = plan(
        "engines: {start_timeout: 600}\n"
        "deployments: {a: {model: m}, b: {model: n, start_timeout: 30}}\n"
    )
    assert [e.start_timeout for e in p.engines] == [600.0, 30.0]


@pytest.mark.parametrize(
    ("host", "url"),
    [("0.0.0.0", "http://127.0.0.1:8100"), ("::1", "http://[::1]:8100")],
)
def test_engine_url_is_reachable_from_the_gateway(host: str, url: str) -> None:
    p = plan(f"deployments: {{a: {{model: m, listen: tcp, host: '{host}'}}}}\n")
    assert p.engines[0].url == url


# ---------------------------------------------------------------- VLLM_PORT ranges


def test_every_replica_gets_its_own_vllm_port_range_in_file_order() -> None:
    p = plan(
        """
        engines: {vllm_port_base: 24000, vllm_port_span: 50}
        deployments:
          a: {model: m, replicas: 2}
          r: {model: r, endpoints: ["http://10.0.0.1:8000"]}
          b: {model: n}
        """
    )
    got = {e.name: (e.env["VLLM_PORT"], e.vllm_ports) for e in p.engines}
    assert got == {
        "a-0": ("24000", range(24000, 24050)),
        "a-1": ("24050", range(24050, 24100)),
        "b-0": ("24100", range(24100, 24150)),
    }
    assert p.warnings == ()


def test_a_vllm_port_in_the_deployments_env_wins_and_takes_no_range() -> None:
    p = plan(
        """
        deployments:
          a: {model: m, env: {VLLM_PORT: 25000}}
          b: {model: n}
        """
    )
    a, b = p.engines
    assert (a.env["VLLM_PORT"], a.vllm_ports) == ("25000", None)
    assert (b.env["VLLM_PORT"], b.vllm_ports) == ("20000", range(20000, 20100))


def test_replicas_sharing_a_vllm_port_from_env_are_warned_about() -> None:
    p = plan("deployments:\n  a: {model: m, replicas: 2, env: {VLLM_PORT: 25000}}\n")
    (warning,) = p.warnings
    assert "the 2 replicas of `a` all get VLLM_PORT=25000" in warning
    assert "remove VLLM_PORT from `env`" in warning


def test_serving_ports_counted_up_skip_the_vllm_port_ranges() -> None:
    p = plan(
        """
        engines: {base_port: 20099, vllm_port_base: 20100, vllm_port_span: 10}
        deployments:
          a: {model: m, replicas: 3, listen: tcp}
        """
    )
    assert [e.port for e in p.engines] == [20099, 20130, 20131]


def test_ranges_reaching_into_the_ephemeral_ports_are_warned_about() -> None:
    p = plan("engines: {vllm_port_base: 32700}\ndeployments: {a: {model: m}, b: {model: n}}\n")
    (warning,) = p.warnings
    assert warning.startswith("the VLLM_PORT ranges of a-0, b-0 reach into Linux's ephemeral")
    assert "32768-60999" in warning and "lower engines.vllm_port_base" in warning


# ---------------------------------------------------------------- stall detection


@pytest.mark.parametrize(
    ("command", "watched"),
    [
        (["vllm", "serve", "{model}"], True),
        (["/opt/venv/bin/vllm", "serve", "{model}"], True),
        (["uv", "run", "vllm", "serve", "{model}"], True),
        (["{python}", "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}"], True),
        (["{python}", "-m", "vllm", "serve", "{model}"], True),
        (["{python}", "-m", "vllm_fleet.testing.fake_vllm", "{model}"], False),
        (["sglang", "serve", "{model}"], False),
        (["./serve-vllm.sh", "{model}"], False),
    ],
)
def test_stall_detection_applies_to_vllm_commands_only(command: list[str], watched: bool) -> None:
    p = build_plan(
        config.FleetConfig.model_validate(
            {"engine_command": command, "deployments": {"a": {"model": "m"}}}
        ),
        NO_INVENTORY,
        PY,
    )
    assert p.engines[0].stall_timeout == (120.0 if watched else None)


def test_a_deployments_stall_timeout_watches_any_command_and_zero_turns_it_off() -> None:
    p = plan(
        """
        engines: {stall_timeout: 30}
        engine_command: ["./serve-vllm.sh", "{model}"]
        deployments:
          wrapped: {model: m, stall_timeout: 45}
          plain: {model: n}
          unwatched: {model: o, stall_timeout: 0, command: [vllm, serve, "{model}"]}
          vllm: {model: v, command: [vllm, serve, "{model}"]}
        """
    )
    got = {e.deployment: e.stall_timeout for e in p.engines}
    assert got == {"wrapped": 45.0, "plain": None, "unwatched": None, "vllm": 30.0}
    assert (
        plan("engines: {stall_timeout: 0}\ndeployments: {a: {model: m}}\n").engines[0].stall_timeout
        is None
    )


# ---------------------------------------------------------------- Unix sockets


def test_engines_get_a_socket_each_in_the_socket_dir_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "engines: {socket_dir: run/s}\n"
        "deployments:\n  a: {model: m, replicas: 2}\n"
        '  b: {model: n, command: [srv, "{model}", --listen-on, "unix://{uds}"]}\n'
    )
    p = build_plan(config.load(path, environ={}), NO_INVENTORY, PY)
    folder = tmp_path / "run" / "s"
    assert [e.uds for e in p.engines] == [
        folder / "a-0.sock",
        folder / "a-1.sock",
        folder / "b-0.sock",
    ]
    assert [e.port for e in p.engines] == [None, None, None]
    assert p.engines[0].argv[3:5] == ("--uds", str(folder / "a-0.sock"))
    # `{uds}` placed by the command: nothing appended, no --host/--port either.
    assert engine(p, "b-0").argv[:4] == ("srv", "n", "--listen-on", f"unix://{folder}/b-0.sock")
    assert "--uds" not in engine(p, "b-0").argv and "--port" not in engine(p, "b-0").argv


def test_a_socket_path_past_107_bytes_is_refused_naming_engines_socket_dir() -> None:
    deep = "/tmp/" + "d" * 100
    err = plan_error(f"engines: {{socket_dir: {deep}}}\ndeployments: {{a: {{model: m}}}}\n")
    (issue,) = err.issues
    assert issue.where() == "engines.socket_dir"
    assert "longer than the 107 bytes" in issue.message
    assert "set engines.socket_dir to a shorter directory" in issue.message
    assert issue.line == 1
