"""On real vLLM: the CPU demo's two engines (examples/cpu-demo.yaml: chat and embed),
started at the same moment ten times, are ready every time, each with its own VLLM_PORT.

Why engines started together can collide without it (vLLM 0.32's code): every port vLLM
opens for itself besides the serving one comes from `get_open_port()` /
`get_open_ports_list()` (vllm/utils/network_utils.py), which bind a socket to find a
free port, close it, and return the number; the caller binds it later (a
torch.distributed TCPStore: vllm/v1/executor/*, data parallelism in
vllm/config/parallel.py). Without VLLM_PORT the port is the kernel's pick (port 0), and
between the release and the bind another engine starting at that moment can be handed
the same one (vLLM #39015, #43206); with one VLLM_PORT in the fleet's environment, which
every engine inherits, both scan up from the same port, find the same first free one,
and collide for certain. The fleet gives each engine its own range instead
(config_checks.vllm_port_blocks), overriding an inherited VLLM_PORT, which this test sets
on purpose.

What this build does at tensor-parallel size 1 (seen here with the demo's engines, and
in vllm/v1/executor/multiproc_executor.py): the workers meet through a FileStore
(`get_file_store_init_method()`), not a TCPStore, unless ROCm's AITER all-reduce is on;
so these engines listen on their serving socket (and on ports of the kernel's choosing
for their own processes' messages) and never read VLLM_PORT. The race is
real for the Ray executor, data parallelism, multi-node and fault tolerance, which this
machine cannot run. So the test proves what it can: both engines get ready every round,
each engine's API server runs with its own VLLM_PORT (which its engine core and worker
inherit), and none listens on a port in the other's range. It does not reproduce the collision.

Each round starts both engines through the supervisor (the same code `fleet up` runs),
waits until both are ready (a failed start is not retried: max_restarts 0), checks, and
stops them (SIGTERM to each group, reaped). About a minute a round on 2 cores.

Needs `make engines-env models`; skips without them, fails with FLEET_E2E_REQUIRED=1.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import group_members, listening_ports
from tests.e2e.test_vllm_cpu import (
    DEMO_FILE,
    ENGINE_PYTHON,
    MODELS,
    READY_TIMEOUT,
    require_prerequisites,
    two_server_ports,
)
from vllm_fleet.config import load
from vllm_fleet.engines import Supervisor
from vllm_fleet.engines.supervisor import read_log_tail
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import EngineSpec, build_plan
from vllm_fleet.registry import Registry, State

ROUNDS = 10
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(ROUNDS * 240)]


def vllm_ports_seen(pids: list[int]) -> set[str | None]:
    """The VLLM_PORT values in the environments of `pids` as /proc shows them (None: not
    there). vLLM's engine core and worker rename themselves (setproctitle), which writes
    over the memory /proc/<pid>/environ reads: theirs show None, though they run with
    the environment of the API server that started them."""
    seen: set[str | None] = set()
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"VLLM_PORT=")]
        seen.add(values[-1] if values else None)
    return seen


async def one_round(specs_env: dict[str, str], logs: Path) -> tuple[float, list[str]]:
    """Start both engines at once, wait until settled, check them, stop them. Returns how
    long they took to be ready and the problems found."""
    environ = dict(os.environ) | specs_env | {"FLEET_LOG_DIR": str(logs)}
    config = load(DEMO_FILE, environ=environ)
    no_retry = config.engines.model_copy(update={"max_restarts": 0})
    config = config.model_copy(update={"engines": no_retry})
    plan = build_plan(config, Inventory(None, "e2e"), sys.executable)
    registry = Registry(config, plan)
    supervisor = Supervisor(registry)
    problems: list[str] = []
    started = time.monotonic()
    groups: list[int] = []
    await supervisor.start()
    try:
        await asyncio.wait_for(supervisor.wait_settled(), READY_TIMEOUT)
        took = time.monotonic() - started
        engines = [(u, u.spec) for u in registry.all()]
        for up, spec in engines:
            assert isinstance(spec, EngineSpec) and spec.vllm_ports is not None
            if up.state is not State.READY or up.restarts:
                tail = "\n    ".join(read_log_tail(spec.log_path))
                problems.append(f"{up.name} {up.state.value}: {up.message}\n    {tail}")
                continue
            assert up.pid is not None
            groups.append(up.pid)
            members = group_members(up.pid)
            own = str(spec.vllm_ports.start)
            # The API server (the process the fleet started) has the plan's VLLM_PORT, not
            # the one in the fleet's environment; no process of the engine has another.
            if vllm_ports_seen([up.pid]) != {own} or vllm_ports_seen(members) - {own, None}:
                seen = {pid: vllm_ports_seen([pid]) for pid in members}
                problems.append(f"{up.name}: VLLM_PORT {own} planned, processes have {seen}")
            listens = listening_ports(members)
            if spec.uds is not None:  # the default: its socket, and no serving TCP port
                if not spec.uds.is_socket():
                    problems.append(f"{up.name}: no socket at {spec.uds}")
            elif spec.port not in listens:
                problems.append(f"{up.name}: not listening on {spec.port} ({listens})")
            for other_up, other in engines:
                assert isinstance(other, EngineSpec) and other.vllm_ports is not None
                inside = sorted(p for p in listens if p in other.vllm_ports)
                if other_up is not up and inside:
                    problems.append(f"{up.name} listens on {inside}, in {other_up.name}'s range")
    finally:
        await supervisor.stop()
    left = {pgid: group_members(pgid) for pgid in groups}
    problems.extend(f"group {g} outlived the stop: {pids}" for g, pids in left.items() if pids)
    return took, problems


def test_the_demos_two_engines_started_together_are_ready_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_prerequisites()
    # One VLLM_PORT for everyone, as a shell that exported it would give: the plan's own
    # per-engine value (20000, 20100) must win over it.
    monkeypatch.setenv("VLLM_PORT", "29000")
    base = {"FLEET_ENGINE_PYTHON": str(ENGINE_PYTHON), "FLEET_MODELS": str(MODELS)}
    if (os.cpu_count() or 1) < 2:  # the demo binds chat to CPU 0 and embed to CPU 1
        base |= {"FLEET_CHAT_CPUS": "auto", "FLEET_EMBED_CPUS": "auto"}
    times: list[float] = []
    failures: list[str] = []
    for index in range(ROUNDS):
        env = base | {"FLEET_BASE_PORT": str(two_server_ports())}
        took, problems = asyncio.run(one_round(env, tmp_path / f"round-{index}"))
        times.append(took)
        failures.extend(f"round {index + 1}: {p}" for p in problems)
    print(
        f"\n{ROUNDS} rounds, both engines ready in {min(times):.0f}-{max(times):.0f}s "
        f"(mean {sum(times) / len(times):.0f}s)"
    )
    assert not failures, "\n".join(failures)
