"""On real vLLM (the CPU build, where sleep mode does not exist, so this is the cold-start
path): two SmolLM2 deployments with `start: on_demand` in one `swap_group`. Nothing loads
at `fleet up`; a request to each in turn is answered by the right one, each swap stops
the other engine first (the two never run at once: watched all along), and the time from
the request to its first token is set against the engine's own load time. The figures
are printed (run with `-s`) and written to `on-demand-figures.json` in the test's folder.

Needs `make engines-env models`; skips without them, fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import OpenAI

from tests.conftest import free_port, wait_until
from tests.e2e.test_vllm_cpu import (
    DEMO_FILE,
    MESSAGES,
    REPO,
    Fleet,
    _stop,
    demo_env,
    require_prerequisites,
    two_server_ports,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


def on_demand_file(path: Path) -> None:
    """The CPU demo's chat model as two on-demand deployments sharing one swap group."""
    demo = yaml.safe_load(DEMO_FILE.read_text())
    chat = demo["deployments"]["chat"]
    deployments = {}
    for name, length in (("first", "2048"), ("second", "1024")):
        deployments[name] = {
            "model": chat["model"],
            "served_name": f"smollm2-{name}",
            "env": {**chat["env"], "VLLM_CPU_OMP_THREADS_BIND": "auto"},
            "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", length],
            "start": "on_demand",
            "swap_group": "cpu",
            "queue_timeout": 600,
        }
    demo["deployments"] = deployments
    path.write_text(yaml.safe_dump(demo, sort_keys=False))


def first_token(client: OpenAI, dep: str) -> tuple[float, str, str]:
    """(seconds to the first token, the response's model, the text) of one streamed chat."""
    began = time.monotonic()
    took: float | None = None
    model, text = "", ""
    for chunk in client.chat.completions.create(
        model=dep, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content and took is None:
            took = time.monotonic() - began
        model = chunk.model or model
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert took is not None, "no token came"
    return took, model, text


def load_seconds(upstream: dict[str, Any]) -> float:
    """The engine's own load time, as the supervisor saw it: spawn to /health 200."""
    found = re.search(r"ready after ([0-9.]+)s", upstream.get("message", ""))
    assert found, upstream
    return float(found.group(1))


def test_two_on_demand_engines_take_turns_on_one_swap_group(tmp_path: Path) -> None:
    require_prerequisites()
    path = tmp_path / "fleet.yaml"
    on_demand_file(path)
    port = free_port()
    env = demo_env(tmp_path, two_server_ports())
    output = tmp_path / "fleet-up.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_fleet.cli", "up", str(path), "--port", str(port)],
            cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    fleet = Fleet(base=f"http://127.0.0.1:{port}", proc=proc, output=output)
    watching = threading.Event()
    together: list[dict[str, Any]] = []

    def watch() -> None:  # the two engines never run at once
        while not watching.is_set():
            try:
                ups = fleet.upstreams(fleet.status())
            except (OSError, AssertionError):
                time.sleep(0.2)
                continue
            running = [u for u in ups if u.get("pid")]
            if len(running) > 1:
                together.append({u["name"]: (u["state"], u["pid"]) for u in ups})
            time.sleep(0.2)

    try:
        wait_until(lambda: _answers(fleet), timeout=60, interval=0.5, what="the gateway")
        status = fleet.status()
        assert [u["state"] for u in fleet.upstreams(status)] == ["unloaded", "unloaded"]
        assert status["on_demand"]["groups"]["cpu"]["members"] == ["first", "second"]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        client = OpenAI(base_url=f"{fleet.base}/v1", api_key="x", max_retries=0, timeout=900)
        figures: dict[str, Any] = {"turns": []}
        for dep in ("first", "second", "first"):
            ttft, model, text = first_token(client, dep)
            assert model == f"smollm2-{dep}", (dep, model)  # answered by the right engine
            assert text.strip(), dep
            status = fleet.status()
            ups = {u["deployment"]: u for u in fleet.upstreams(status)}
            other = "second" if dep == "first" else "first"
            assert ups[dep]["state"] == "ready" and ups[other]["state"] == "unloaded", ups
            swap = status["on_demand"]["groups"]["cpu"]["last_swap"]
            engine_load = load_seconds(ups[dep])
            turn = {
                "deployment": dep,
                "first_token_s": round(ttft, 2),
                "engine_load_s": engine_load,
                "unload_other_s": swap["unload_s"],
                "swap_s": swap["seconds"],
                "kind": swap["kind"],
                "fleet_overhead_s": round(ttft - engine_load - swap["unload_s"], 2),
            }
            figures["turns"].append(turn)
        watching.set()
        watcher.join(5)
        assert together == [], together
        kinds = [t["kind"] for t in figures["turns"]]
        assert kinds == ["cold_start", "cold_start", "cold_start"], figures
        (tmp_path / "on-demand-figures.json").write_text(json.dumps(figures, indent=2))
        print("\nreal-vLLM on-demand figures:", json.dumps(figures))
    except BaseException:
        print(fleet.tail())
        raise
    finally:
        watching.set()
        _stop(fleet)


def _answers(fleet: Fleet) -> bool:
    try:
        fleet.status()
    except (OSError, AssertionError):
        assert fleet.proc.poll() is None, fleet.tail()
        return False
    return True
