"""Pure: a FleetConfig (+ the GPU inventory) becomes the exact engines to start.

Each replica of each deployment becomes one EngineSpec: its argv, the environment it adds
over the parent's, its port and GPUs. Deployments with `endpoints:` become RemoteSpecs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vllm_fleet.config import ConfigError, ConfigIssue, Deployment, FleetConfig
from vllm_fleet.config.checks import engine_ports, flag_name, vllm_port_blocks
from vllm_fleet.gpus import Inventory

_PLACEHOLDER = re.compile(r"\{(model|host|port|python|id)\}")
# Linux's default ephemeral ports (net.ipv4.ip_local_port_range): outgoing connections
# take ports here at random, so a VLLM_PORT range inside it can lose a port to one.
EPHEMERAL_PORTS = range(32768, 61000)


@dataclass(frozen=True)
class EngineSpec:
    """One engine process the fleet starts and supervises."""

    deployment: str
    replica: int
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added over the parent's environment
    host: str
    port: int
    gpus: tuple[int, ...] | None
    log_path: Path
    start_timeout: float
    # Engines start in the fleet file's directory: relative paths in the file (a local
    # model folder, the command) are relative to the file, wherever `fleet up` runs.
    cwd: Path
    served_names: tuple[str, ...]
    # The engine's own block for vLLM's internal ports (VLLM_PORT is its first port);
    # None when the deployment's `env` sets VLLM_PORT itself.
    vllm_ports: range | None
    # Seconds busy without token progress before it counts as stalled; None when not
    # watched (stall_timeout 0, or a command that is not vLLM: health checks only).
    stall_timeout: float | None

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.replica}"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class RemoteSpec:
    """An engine running elsewhere (`endpoints:`): routed to, never started."""

    deployment: str
    replica: int
    url: str

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.replica}"


@dataclass(frozen=True)
class Plan:
    engines: tuple[EngineSpec, ...]
    remotes: tuple[RemoteSpec, ...]
    inventory: Inventory
    warnings: tuple[str, ...] = field(default=())

    def for_deployment(self, dep_id: str) -> list[EngineSpec | RemoteSpec]:
        found: list[EngineSpec | RemoteSpec] = [e for e in self.engines if e.deployment == dep_id]
        found.extend(r for r in self.remotes if r.deployment == dep_id)
        return found


def build_plan(config: FleetConfig, inventory: Inventory, python: str) -> Plan:
    """Decide every engine's ports, GPUs, argv and env. Raises ConfigError on what the
    machine cannot satisfy (a GPU index it does not have, a GPU count it cannot fill)."""
    issues: list[ConfigIssue] = []
    warnings: list[str] = []
    gpu_plan = _assign_gpus(config, inventory, issues, warnings)
    blocks = vllm_port_blocks(config)
    port_plan = _assign_ports(config, issues, blocks)
    engines: list[EngineSpec] = []
    remotes: list[RemoteSpec] = []
    log_dir = config.log_dir()
    for dep_id, dep in config.deployments.items():
        if dep.remote:
            remotes.extend(RemoteSpec(dep_id, i, url) for i, url in enumerate(dep.endpoints))
            continue
        for replica in range(dep.replicas):
            port = port_plan[(dep_id, replica)]
            gpus = gpu_plan.get((dep_id, replica))
            block = blocks.get((dep_id, replica))
            engines.append(
                EngineSpec(
                    deployment=dep_id,
                    replica=replica,
                    argv=tuple(engine_argv(config, dep_id, dep, port, python)),
                    env=engine_env(config, dep, gpus, block),
                    host=dep.host,
                    port=port,
                    gpus=gpus,
                    log_path=log_dir / f"{dep_id}-{replica}.log",
                    cwd=Path(config.base_dir),
                    start_timeout=dep.start_timeout or config.engines.start_timeout,
                    served_names=tuple(served_names(dep_id, dep)),
                    vllm_ports=block,
                    stall_timeout=stall_watch(config, dep)[0],
                )
            )
    unpinned = [e.name for e in engines if e.gpus is None]
    if inventory.gpus and len(unpinned) > 1:
        warnings.append(
            f"engines {', '.join(unpinned)} set no `gpus`: each sees every GPU and they will "
            "compete for GPU memory; give each deployment `gpus:`"
        )
    warnings.extend(_vllm_port_warnings(config, blocks))
    if issues:
        for issue in issues:
            issue.line = issue.line or config.line_of(issue.loc)
        raise ConfigError(config.source, issues)
    return Plan(tuple(engines), tuple(remotes), inventory, tuple(warnings))


def served_names(dep_id: str, dep: Deployment) -> list[str]:
    """`--served-model-name` values: `served_name` (default: the model code) first, as
    responses carry it, then the model code, id and aliases, so the engine accepts every
    name a client may use."""
    names = [dep.served_as, dep.model, dep_id, *dep.aliases]
    return list(dict.fromkeys(names))


def engine_argv(
    config: FleetConfig, dep_id: str, dep: Deployment, port: int, python: str
) -> list[str]:
    template = dep.command if dep.command is not None else config.engine_command
    values = {
        "model": dep.model,
        "host": dep.host,
        "port": str(port),
        "python": python,
        "id": dep_id,
    }
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in template]
    joined = " ".join(template)
    if "{host}" not in joined:
        argv += ["--host", dep.host]
    if "{port}" not in joined:
        argv += ["--port", str(port)]
    argv += ["--served-model-name", *served_names(dep_id, dep)]
    argv += dep.args
    return argv


def runs_vllm(command: list[str]) -> bool:
    """Whether a command template runs vLLM's server, whose /metrics the stall check
    reads: a program named `vllm` anywhere in it (`vllm serve`, `uv run vllm serve`,
    `/opt/venv/bin/vllm`), or `-m vllm` / `-m vllm.<module>` (the CPU build's
    `python -m vllm.entrypoints.openai.api_server`)."""
    for index, part in enumerate(command):
        if Path(part).name == "vllm":
            return True
        module = command[index + 1] if part == "-m" and index + 1 < len(command) else ""
        if module == "vllm" or module.startswith("vllm."):
            return True
    return False


def stall_watch(config: FleetConfig, dep: Deployment) -> tuple[float | None, str]:
    """The engines' stall timeout (None: not watched, health checks only) and what
    `fleet check` says about it. The deployment's own `stall_timeout` also watches a
    command not recognised as vLLM; else `engines.stall_timeout` for vLLM commands. 0 is
    off, and so is `--disable-log-stats` (vLLM then exports none of its metrics)."""
    template = dep.command if dep.command is not None else config.engine_command
    own = dep.stall_timeout is not None
    timeout = dep.stall_timeout if dep.stall_timeout is not None else config.engines.stall_timeout
    if not timeout:
        return None, "off (stall_timeout: 0); health checks only"
    if any(flag_name(arg) == "--disable-log-stats" for arg in dep.args):
        return None, "off: --disable-log-stats turns vLLM's metrics off; health checks only"
    if not own and not runs_vllm(template):
        return None, (
            "off: the command is not vLLM (no vLLM metrics to read); health checks only "
            "(set the deployment's stall_timeout if it runs vLLM)"
        )
    return timeout, f"on: restarted when busy {timeout:g}s without token progress (vLLM's /metrics)"


def engine_env(
    config: FleetConfig,
    dep: Deployment,
    gpus: tuple[int, ...] | None,
    vllm_ports: range | None = None,
) -> dict[str, str]:
    env = dict(dep.env)
    if gpus is not None:
        # CUDA numbers GPUs fastest-first by default; nvidia-smi (and so the fleet file)
        # by PCI bus. Make them agree, or on a mixed machine `gpus: [0]` is another card.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    if config.gateway.accept_any_model:
        env["VLLM_SKIP_MODEL_NAME_VALIDATION"] = "1"
    if vllm_ports is not None:
        # Set even when the fleet's own environment has one: every engine inheriting the
        # same VLLM_PORT would scan from the same port and collide for certain.
        env["VLLM_PORT"] = str(vllm_ports.start)
    return env


def _vllm_port_warnings(config: FleetConfig, blocks: dict[tuple[str, int], range]) -> list[str]:
    warnings = []
    eph = EPHEMERAL_PORTS
    reaching = [
        f"{d}-{r}" for (d, r), b in blocks.items() if b.start < eph.stop and eph.start < b.stop
    ]
    if reaching:
        warnings.append(
            f"the VLLM_PORT ranges of {', '.join(reaching)} reach into Linux's ephemeral "
            f"ports ({EPHEMERAL_PORTS.start}-{EPHEMERAL_PORTS.stop - 1}), where outgoing "
            "connections take ports at random; lower engines.vllm_port_base or "
            "engines.vllm_port_span"
        )
    for dep_id, dep in config.deployments.items():
        if "VLLM_PORT" in dep.env and dep.replicas > 1 and not dep.remote:
            warnings.append(
                f"the {dep.replicas} replicas of `{dep_id}` all get VLLM_PORT="
                f"{dep.env['VLLM_PORT']} from its env: started together they scan from the "
                "same port and can collide; remove VLLM_PORT from `env` to give each its "
                "own range"
            )
    return warnings


def _assign_ports(
    config: FleetConfig, issues: list[ConfigIssue], blocks: dict[tuple[str, int], range]
) -> dict[tuple[str, int], int]:
    """Fixed ports as written; the rest counted up from `engines.base_port`, skipping
    every port the file names (including the gateway's) and the VLLM_PORT ranges."""
    taken = {config.gateway.port}
    for block in blocks.values():
        taken.update(block)
    for dep in config.deployments.values():
        taken.update(engine_ports(dep))
    ports: dict[tuple[str, int], int] = {}
    next_port = config.engines.base_port
    for dep_id, dep in config.deployments.items():
        if dep.remote:
            continue
        fixed = engine_ports(dep)
        for replica in range(dep.replicas):
            if fixed:
                ports[(dep_id, replica)] = fixed[replica]
                continue
            while next_port in taken:
                next_port += 1
            if next_port > 65535:
                issues.append(
                    ConfigIssue(
                        loc=("engines", "base_port"),
                        message=f"no port left for `{dep_id}` replica {replica}: counting up "
                        f"from {config.engines.base_port} passes 65535; lower `base_port`",
                    )
                )
            ports[(dep_id, replica)] = next_port
            taken.add(next_port)
    return ports


def _assign_gpus(
    config: FleetConfig,
    inventory: Inventory,
    issues: list[ConfigIssue],
    warnings: list[str],
) -> dict[tuple[str, int], tuple[int, ...]]:
    known = set(inventory.indices) if inventory.gpus is not None else None
    used: set[int] = set()
    plan: dict[tuple[str, int], tuple[int, ...]] = {}
    counted: list[tuple[str, Deployment]] = []
    for dep_id, dep in config.deployments.items():
        if dep.remote or dep.gpus is None:
            continue
        if isinstance(dep.gpus, int):
            counted.append((dep_id, dep))
            continue
        for index, gpu in enumerate(dep.gpus):
            if known is not None and gpu not in known:
                have = ", ".join(str(i) for i in sorted(known)) or "none"
                issues.append(
                    ConfigIssue(
                        loc=("deployments", dep_id, "gpus", index),
                        message=f"this machine has no GPU {gpu} (it has: {have}); an engine "
                        "pinned to a missing GPU silently sees no GPU at all",
                    )
                )
        used.update(dep.gpus)
        share = len(dep.gpus) // dep.replicas
        for replica in range(dep.replicas):
            plan[(dep_id, replica)] = tuple(dep.gpus[replica * share : (replica + 1) * share])
    if counted and known is None:
        for dep_id, _ in counted:
            issues.append(
                ConfigIssue(
                    loc=("deployments", dep_id, "gpus"),
                    message=f"a GPU count needs the machine's GPU inventory ({inventory.reason}); "
                    "list the GPU indices instead, e.g. `gpus: [0, 1]`",
                )
            )
        return plan
    free = [i for i in sorted(known or ()) if i not in used]
    for dep_id, dep in counted:
        assert isinstance(dep.gpus, int)
        for replica in range(dep.replicas):
            if len(free) < dep.gpus:
                issues.append(
                    ConfigIssue(
                        loc=("deployments", dep_id, "gpus"),
                        message=f"replica {replica} needs {dep.gpus} GPU(s) but only "
                        f"{len(free)} are left unassigned on this machine "
                        f"(GPUs {', '.join(map(str, sorted(known or ())))}); lower the count "
                        "or the replicas",
                    )
                )
                break
            plan[(dep_id, replica)] = tuple(free[: dep.gpus])
            free = free[dep.gpus :]
    return plan
