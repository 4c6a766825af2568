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
from vllm_fleet.config.checks import engine_ports
from vllm_fleet.gpus import Inventory

_PLACEHOLDER = re.compile(r"\{(model|host|port|python|id)\}")


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
    port_plan = _assign_ports(config, issues)
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
            engines.append(
                EngineSpec(
                    deployment=dep_id,
                    replica=replica,
                    argv=tuple(engine_argv(config, dep_id, dep, port, python)),
                    env=engine_env(config, dep, gpus),
                    host=dep.host,
                    port=port,
                    gpus=gpus,
                    log_path=log_dir / f"{dep_id}-{replica}.log",
                    cwd=Path(config.base_dir),
                    start_timeout=dep.start_timeout or config.engines.start_timeout,
                    served_names=tuple(served_names(dep_id, dep)),
                )
            )
    unpinned = [e.name for e in engines if e.gpus is None]
    if inventory.gpus and len(unpinned) > 1:
        warnings.append(
            f"engines {', '.join(unpinned)} set no `gpus`: each sees every GPU and they will "
            "compete for GPU memory; give each deployment `gpus:`"
        )
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


def engine_env(
    config: FleetConfig, dep: Deployment, gpus: tuple[int, ...] | None
) -> dict[str, str]:
    env = dict(dep.env)
    if gpus is not None:
        # CUDA numbers GPUs fastest-first by default; nvidia-smi (and so the fleet file)
        # by PCI bus. Make them agree, or on a mixed machine `gpus: [0]` is another card.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    if config.gateway.accept_any_model:
        env["VLLM_SKIP_MODEL_NAME_VALIDATION"] = "1"
    return env


def _assign_ports(config: FleetConfig, issues: list[ConfigIssue]) -> dict[tuple[str, int], int]:
    """Fixed ports as written; the rest counted up from `engines.base_port`, skipping
    every port the file names (including the gateway's)."""
    taken = {config.gateway.port}
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
