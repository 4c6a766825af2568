"""The two engines and the fleet in front of them: the fleet file (real vLLM or, with
`--quick`, fake engines), `fleet up`, switching the routing policy by a reload, and
reading and emptying the engines' prefix caches directly on their ports."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.fronts import fleet_command
from bench.procs import Managed
from vllm_fleet.testing.harness import free_port, free_ports

DEPLOYMENT = "chat"
ROOT = Path(__file__).resolve().parents[2]
SERVED = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The fake engines of --quick: a KV block of 16 words, a cache of 4,096 blocks, and a
# prefill cost per uncached token that makes a cache hit visible in the time to first token.
FAKE_ENV = {
    "FAKE_VLLM_BLOCK_TOKENS": "16",
    "FAKE_VLLM_PREFIX_BLOCKS": "4096",
    "FAKE_VLLM_PREFILL_US_PER_TOKEN": "300",
}


@dataclass
class EngineSet:
    """How the bench reaches the engines: real vLLM or fake, and their options."""

    quick: bool
    models: Path
    engine_python: Path
    kv_blocks: int | None = None  # --num-gpu-blocks-override: a smaller KV cache


def fleet_data(
    engines: EngineSet, gateway_port: int, engine_port: int, routing: str
) -> dict[str, Any]:
    dep: dict[str, Any] = {
        "replicas": 2,
        "listen": "tcp",  # nginx and vllm-router reach the same engines on their ports
        "port": engine_port,
        "routing": routing,
    }
    if engines.quick:
        dep.update(
            model="bench/smollm2",
            served_name=SERVED,
            env={**FAKE_ENV, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(ROOT / "src")},
            args=["--tokens", "16", "--token-delay", "0.002"],
        )
        command = ["{python}", "-m", "vllm_fleet.testing.fake_vllm", "{model}"]
        start_timeout = 60
    else:
        args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048"]
        if engines.kv_blocks:
            args += ["--num-gpu-blocks-override", str(engines.kv_blocks)]
        dep.update(
            model=str(engines.models / "smollm2-135m-instruct"),
            served_name=SERVED,
            env={
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_SERVER_DEV_MODE": "1",  # /reset_prefix_cache, used between setups
                "HF_HUB_OFFLINE": "1",
            },
            args=args,
        )
        # Each replica's threads on a core of its own (replica 0 on CPU 0, replica 1 on
        # CPU 1), as the CPU demo binds its two engines: a shell in front of vLLM picks
        # the core by the replica's port (the fleet file has no per-replica environment).
        # `-m vllm...` stays a word of its own, so the fleet still knows the command runs
        # vLLM and reads its /metrics for the load signals.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            ports = f"{engine_port}) c={cpus[0]};; *) c={cpus[1]};;"
            bind = f"case {{port}} in {ports} esac; export VLLM_CPU_OMP_THREADS_BIND=$c"
        else:  # one core: both replicas on it
            bind = "export VLLM_CPU_OMP_THREADS_BIND=nobind"
        bind += '; exec "$@"'
        command = ["/bin/sh", "-c", bind, "sh", str(engines.engine_python)]
        command += ["-m", "vllm.entrypoints.openai.api_server", "--port", "{port}"]
        command += ["--model", "{model}"]
        start_timeout = 900
    return {
        "gateway": {"host": "127.0.0.1", "port": gateway_port},
        "engines": {"log_dir": "logs", "start_timeout": start_timeout, "stop_timeout": 20},
        "engine_command": command,
        "deployments": {DEPLOYMENT: dep},
    }


class Fleet:
    """`fleet up` on the bench's fleet file, in `workdir`."""

    def __init__(self, workdir: Path, engines: EngineSet) -> None:
        self.workdir = workdir
        self.engines = engines
        self.port = free_port()
        self.engine_port = free_ports(2)
        self.file = workdir / "routing-fleet.yaml"
        self.write("least_outstanding")
        cpus = frozenset(os.sched_getaffinity(0))
        self.proc = Managed(
            "fleet",
            [*fleet_command(), "up", str(self.file)],
            cpus,
            workdir / "fleet-up.log",
            cwd=workdir,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.engine_port + i}" for i in range(2)]

    def write(self, routing: str, path: Path | None = None) -> Path:
        data = fleet_data(self.engines, self.port, self.engine_port, routing)
        target = path or self.file
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        return target

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/fleet/status", timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
            return data

    def routing_stats(self) -> dict[str, Any]:
        """The deployment's routing policy counters, as `fleet status` shows them."""
        routing: dict[str, Any] = self.status().get("routing", {}).get(DEPLOYMENT, {})
        return routing

    def wait_ready(self, timeout: float) -> dict[str, int]:
        """Both replicas ready: replica name -> pid."""
        deadline = time.monotonic() + timeout
        seen: Any = None
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"`fleet up` exited; see {self.proc.log}")
            try:
                ups = self.status()["deployments"][DEPLOYMENT]["upstreams"]
            except OSError as exc:
                seen = exc
            else:
                seen = [(u["name"], u["state"]) for u in ups]
                if len(ups) == 2 and all(u["state"] == "ready" for u in ups):
                    return {u["name"]: int(u["pid"]) for u in ups}
            time.sleep(1.0)
        raise TimeoutError(f"the engines were not ready in {timeout:g} s: {seen}")

    def set_routing(self, routing: str) -> None:
        """`fleet reload` with the policy changed: in place, the engines untouched."""
        self.write(routing)
        done = subprocess.run(
            [*fleet_command(), "reload", str(self.file), "--url", self.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"`fleet reload` failed:\n{done.stdout}{done.stderr}")

    def stop(self) -> None:
        self.proc.stop(grace=60)


def engine_counters(urls: list[str]) -> list[dict[str, float]]:
    """Each engine's prefix-cache counters (tokens) and requests, from its /metrics."""
    out = []
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            samples = _sums(resp.read().decode())
        out.append(
            {
                "queries": samples.get("vllm:prefix_cache_queries_total", 0.0),
                "hits": samples.get("vllm:prefix_cache_hits_total", 0.0),
                "prompt_tokens": samples.get("vllm:prompt_tokens_total", 0.0),
            }
        )
    return out


def _sums(text: str) -> dict[str, float]:
    """Every sample of a Prometheus page summed by name (over engine cores and labels)."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def reset_prefix_caches(urls: list[str]) -> None:
    """Empty both engines' prefix caches (vLLM's dev route), so every setup starts cold."""
    for url in urls:
        req = urllib.request.Request(f"{url}/reset_prefix_cache", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url}/reset_prefix_cache answered {resp.status}")
