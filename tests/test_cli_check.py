"""`fleet check` as a person runs it: a real subprocess, its exit code and what it prints."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = REPO / "examples" / "seed-two-models.yaml"
H200_CSV = Path(__file__).resolve().parent / "fixtures" / "nvidia-smi-h200" / "query-gpu.csv"
SECRET = "hf_Zq8SecretValue0123456789"


def fleet_check(path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `fleet check PATH` with PATH = bin_dir only (so whether an nvidia-smi exists is
    up to the test), a wide terminal (no wrapping), and `env` added."""
    full_env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    full_env.update(PATH=str(bin_dir), COLUMNS="400", NO_COLOR="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", "check", str(path)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_check_seed_example_prints_each_engine_exactly(tmp_path: Path) -> None:
    done = fleet_check(SEED, tmp_path, HF_TOKEN=SECRET)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = out.splitlines()
    assert lines[0] == f"ok {SEED}: 2 deployment(s)"
    assert "gateway: http://127.0.0.1:8080" in lines
    assert any(
        line.startswith("GPUs: no GPU inventory (nvidia-smi not found")
        and line.endswith("GPU indices in the file are trusted")
        for line in lines
    ), out
    logs, sockets = SEED.parent / ".fleet" / "logs", SEED.parent / ".fleet" / "sockets"
    assert (
        f"qwen-0  GPUs: 0  listens: {sockets / 'qwen-0.sock'}  log: {logs / 'qwen-0.log'}" in lines
    )
    assert (
        "  CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0 VLLM_PORT=20000 "
        f"vllm serve Qwen/Qwen2.5-1.5B-Instruct --uds {sockets / 'qwen-0.sock'} "
        "--served-model-name Qwen/Qwen2.5-1.5B-Instruct qwen qwen2.5 "
        "--shutdown-timeout 30 "
        "--enforce-eager"
    ) in lines
    assert (
        f"mistral-0  GPUs: 1,2  listens: {sockets / 'mistral-0.sock'}  "
        f"log: {logs / 'mistral-0.log'}"
    ) in lines
    assert (
        "  HF_TOKEN='****' CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=1,2 VLLM_PORT=20100 "
        "vllm serve "
        f"mistralai/Mistral-Small-3.1-24B-Instruct-2503 --uds {sockets / 'mistral-0.sock'} "
        "--served-model-name mistralai/Mistral-Small-3.1-24B-Instruct-2503 mistral "
        "--shutdown-timeout 30 "
        "--tokenizer-mode mistral --config-format mistral --load-format mistral "
        "--tool-call-parser mistral --enable-auto-tool-choice "
        "--limit-mm-per-prompt '{\"image\":10}' --tensor-parallel-size 2"
    ) in lines
    # Each engine's own range of vLLM's internal ports, and its stall check.
    watched = "stall check: on: restarted when busy 120s without token progress (vLLM's /metrics)"
    assert f"  vLLM internal ports: 20000-20099 (VLLM_PORT=20000); {watched}" in lines
    assert f"  vLLM internal ports: 20100-20199 (VLLM_PORT=20100); {watched}" in lines
    # the token reached the plan (masked), and its value is printed nowhere
    assert SECRET not in out and SECRET not in done.stderr
    assert SECRET[:8] not in out


def test_check_says_which_engines_are_watched_for_stalls_and_whose_vllm_port_wins(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "engine_command: [python3, -m, vllm_fleet.testing.fake_vllm, '{model}']\n"
        "deployments:\n"
        "  fake: {model: m}\n"
        "  own: {model: n, env: {VLLM_PORT: '25000'}, stall_timeout: 30}\n"
        "  quiet: {model: o, command: [vllm, serve, '{model}'], args: [--disable-log-stats]}\n"
    )
    done = fleet_check(path, tmp_path, VLLM_PORT="29000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert (
        "  vLLM internal ports: 20000-20099 (VLLM_PORT=20000); stall check: off: the command "
        "is not vLLM (no vLLM metrics to read); health checks only (set the deployment's "
        "stall_timeout if it runs vLLM)"
    ) in lines
    assert (
        "  vLLM internal ports: from VLLM_PORT=25000, set in the deployment's env (it wins; no "
        "range reserved); stall check: on: restarted when busy 30s without token progress "
        "(vLLM's /metrics)"
    ) in lines
    assert (
        "  vLLM internal ports: 20100-20199 (VLLM_PORT=20100); stall check: off: "
        "--disable-log-stats turns vLLM's metrics off; health checks only"
    ) in lines
    # The fleet's own VLLM_PORT (29000 here) is not what engines get: theirs is in the plan.
    assert "VLLM_PORT=29000" not in done.stdout


def test_check_with_a_gpu_inventory_lists_the_gpus(tmp_path: Path) -> None:
    rows = "".join(f"{i}, GPU-{i}, NVIDIA H100 80GB HBM3, 81559, 0, 81000\n" for i in range(4))
    (tmp_path / "gpus.csv").write_text(rows)
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nexec /bin/cat '{tmp_path / 'gpus.csv'}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = fleet_check(SEED, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "GPUs: 4 GPU(s): 0: NVIDIA H100 80GB HBM3 (81559 MiB), 1: NVIDIA H100" in done.stdout


def test_check_on_the_real_one_gpu_machine_refuses_the_missing_gpus(tmp_path: Path) -> None:
    # The H200 fixture: one GPU, index 0. The seed pins mistral to GPUs 1 and 2.
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nexec /bin/cat '{H200_CSV}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    done = fleet_check(SEED, tmp_path)
    assert done.returncode == 1
    assert "line 23, deployments.mistral.gpus[0]: this machine has no GPU 1 (it has: 0)" in (
        done.stderr
    )
    assert "line 23, deployments.mistral.gpus[1]: this machine has no GPU 2 (it has: 0)" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr + done.stdout


def test_check_bad_file_exits_1_naming_place_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(
        "deployments:\n"
        "  qwen:\n"
        "    model: Qwen/Qwen2.5-1.5B-Instruct\n"
        "    gpus: [0, 1]\n"
        "    args: [--port, '9000']\n"
        "  other:\n"
        "    model: m\n"
        "    gpus: [1]\n"
    )
    done = fleet_check(bad, tmp_path)
    assert done.returncode == 1
    err = done.stderr
    assert f"error: {bad}: 2 problem(s) in the fleet file" in err
    assert "line 5, deployments.qwen.args[0]: `--port` is set by the fleet" in err
    assert "line 8, deployments.other.gpus[0]: GPU 1 is already used by deployment `qwen`" in err
    assert "Traceback" not in err + done.stdout
    assert done.stdout == ""


def test_check_missing_file_exits_1(tmp_path: Path) -> None:
    done = fleet_check(tmp_path / "nope.yaml", tmp_path)
    assert done.returncode == 1
    assert f"{tmp_path / 'nope.yaml'}: 1 problem(s)" in done.stderr
    assert "file not found; check the path" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_invalid_yaml_exits_1_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("deployments:\n  a:\n    model: m\n    args: [--x\n")
    done = fleet_check(bad, tmp_path)
    assert done.returncode == 1
    assert "line 5, (top level): not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_lists_the_swap_groups_and_what_each_on_demand_deployment_does(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "engine_command: [python3, -m, vllm_fleet.testing.fake_vllm, '{model}']\n"
        "engines: {start_timeout: 600}\n"
        "deployments:\n"
        "  chat: {model: m1, gpus: [0], start: on_demand, idle_timeout: 300}\n"
        "  code: {model: m2, gpus: [0], start: on_demand, sleep: 1}\n"
        "  embed: {model: m3, gpus: [1]}\n"
    )
    done = fleet_check(path, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("swap group gpu0: GPUs 0; members: chat, code (one loaded at a time)")
    assert lines[at - 1].startswith("on-demand deployments")
    assert lines[at + 1 : at + 5] == [
        "chat (swap group gpu0)",
        "  on request: cold start (start_timeout 600s)",
        "  when idle: unloaded after 300s idle",
        "  queues up to 64 requests for 300s",
    ]
    code = lines.index("code (swap group gpu0)")
    assert lines[code + 1 : code + 4] == [
        "  on request: wake from sleep level 1; the first time, cold start (start_timeout 600s)",
        "  when idle: kept loaded until another member needs the GPUs",
        "  queues up to 64 requests for 300s",
    ]
    # The engines are planned as any other: sleep mode's flag and environment on `code`.
    assert any("VLLM_SERVER_DEV_MODE=1" in line and "--enable-sleep-mode" in line for line in lines)
    assert "embed" not in "\n".join(lines[at - 1 :])
