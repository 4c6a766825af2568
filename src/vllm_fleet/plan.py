"""Pure: a FleetConfig (+ the GPU inventory) becomes the exact engines to start.

Each replica of each deployment becomes one EngineSpec: its argv, the environment it adds
over the parent's, its Unix socket (or, with `listen: tcp`, its port) and GPUs.
Deployments with `endpoints:` become RemoteSpecs.

The plan is stable across reloads: given the running plan as `prior`, an engine whose
process would be the same (`process_key`) keeps its socket or port, GPUs and VLLM_PORT
range, so adding a deployment before it renumbers nothing. An engine that changes gets a
socket, a port and a range no running engine holds, so its replacement can start beside
it (a rolling replace); GPUs counted by number avoid the running engines' GPUs while
others are free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vllm_fleet.config import ConfigError, ConfigIssue, Deployment, FleetConfig
from vllm_fleet.config.checks import engine_ports
from vllm_fleet.config.flags import flag_name
from vllm_fleet.gpu_plan import assign_gpus
from vllm_fleet.gpus import Inventory
from vllm_fleet.lora import NO_LORA, LoraFlags, lora_flags
from vllm_fleet.port_plan import assign_ports, assign_vllm_ports, vllm_port_warnings
from vllm_fleet.socket_plan import assign_sockets, socket_dir
from vllm_fleet.swap_groups import SwapGroup, sleep_warnings, swap_groups

_PLACEHOLDER = re.compile(r"\{(model|host|port|uds|python|id)\}")


@dataclass(frozen=True)
class EngineSpec:
    """One engine process the fleet starts and supervises."""

    deployment: str
    replica: int
    argv: tuple[str, ...]
    env: Mapping[str, str]  # added over the parent's environment
    host: str
    port: int | None  # None: on a Unix socket (`uds`), no TCP port
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
    # The names in `served_names` that come only from the deployment's `aliases`: the
    # gateway rewrites `model` on every route, so they do not make a different engine.
    alias_names: tuple[str, ...] = ()
    # The Unix socket the engine listens on (absolute; `listen: uds`), else None (TCP).
    uds: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.replica}"

    @property
    def url(self) -> str:
        """How to reach it: `unix:/abs/path.sock` (as nginx writes it) on a Unix socket,
        else `http://host:port`. The relay, the health checks and nginx read both."""
        if self.uds is not None:
            return f"unix:{self.uds}"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        """Where it listens, for people: the socket's path, or host:port."""
        return str(self.uds) if self.uds is not None else f"{self.host}:{self.port}"


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
    # On-demand deployments taking turns on the same GPUs (see swap_groups.py).
    groups: tuple[SwapGroup, ...] = field(default=())

    def group_of(self, dep_id: str) -> SwapGroup | None:
        """The swap group the deployment is a member of, if any."""
        return next((g for g in self.groups if dep_id in g.members), None)

    def for_deployment(self, dep_id: str) -> list[EngineSpec | RemoteSpec]:
        found: list[EngineSpec | RemoteSpec] = [e for e in self.engines if e.deployment == dep_id]
        found.extend(r for r in self.remotes if r.deployment == dep_id)
        return found


def build_plan(
    config: FleetConfig, inventory: Inventory, python: str, prior: Plan | None = None
) -> Plan:
    """Decide every engine's ports, GPUs, argv and env. Raises ConfigError on what the
    machine cannot satisfy (a GPU index it does not have, a GPU count it cannot fill).
    `prior`: the running plan, whose unchanged engines keep their places (see above)."""
    issues: list[ConfigIssue] = []
    warnings: list[str] = []
    kept = _keep_prior(config, inventory, python, prior)
    held = [e for e in prior.engines] if prior is not None else []
    gpu_plan = assign_gpus(config, inventory, issues, warnings, kept, held)
    groups = swap_groups(config, gpu_plan, issues)
    blocks = assign_vllm_ports(config, issues, kept, held)
    port_plan = assign_ports(config, issues, blocks, kept, held)
    socket_plan = assign_sockets(
        config,
        issues,
        {key: spec.uds for key, spec in kept.items() if spec.uds is not None},
        {e.uds for e in held if e.uds is not None},
    )
    engines: list[EngineSpec] = []
    remotes: list[RemoteSpec] = []
    for dep_id, dep in config.deployments.items():
        if dep.remote:
            remotes.extend(RemoteSpec(dep_id, i, url) for i, url in enumerate(dep.endpoints))
            continue
        for replica in range(dep.replicas):
            key = (dep_id, replica)
            if key in kept:
                engines.append(kept[key])
                continue
            engines.append(
                _engine_spec(
                    config,
                    dep_id,
                    replica,
                    python,
                    port_plan.get(key),
                    gpu_plan.get(key),
                    blocks.get(key),
                    socket_plan.get(key),
                )
            )
    unpinned = [e.name for e in engines if e.gpus is None]
    if inventory.gpus and len(unpinned) > 1:
        warnings.append(
            f"engines {', '.join(unpinned)} set no `gpus`: each sees every GPU and they will "
            "compete for GPU memory; give each deployment `gpus:`"
        )
    warnings.extend(
        vllm_port_warnings(
            config,
            {(e.deployment, e.replica): e.vllm_ports for e in engines if e.vllm_ports is not None},
        )
    )
    vllm = {d for d, dep in config.deployments.items() if runs_vllm(_template(config, dep))}
    warnings.extend(sleep_warnings(config, inventory, vllm))
    bases = dict.fromkeys(a.base for a in config.adapters.values() if a.base not in vllm)
    warnings.extend(
        f"`{base}` serves adapters but its command is not recognised as vLLM: it gets "
        "vLLM's --enable-lora flags and the fleet loads its adapters through vLLM's "
        "/v1/load_lora_adapter"
        for base in bases
        if base in config.deployments and not config.deployments[base].remote
    )
    if issues:
        for issue in issues:
            issue.line = issue.line or config.line_of(issue.loc)
        raise ConfigError(config.source, issues)
    return Plan(tuple(engines), tuple(remotes), inventory, tuple(warnings), groups)


def _engine_spec(
    config: FleetConfig,
    dep_id: str,
    replica: int,
    python: str,
    port: int | None,
    gpus: tuple[int, ...] | None,
    block: range | None,
    uds: Path | None = None,
    prior_argv: tuple[str, ...] | None = None,
) -> EngineSpec:
    dep = config.deployments[dep_id]
    names = served_names(dep_id, dep)
    lora = lora_flags(config, dep_id, dep, prior_argv)
    return EngineSpec(
        deployment=dep_id,
        replica=replica,
        argv=tuple(engine_argv(config, dep_id, dep, port, python, uds, lora)),
        env=engine_env(config, dep, gpus, block, lora),
        host=dep.host,
        port=port,
        gpus=gpus,
        log_path=config.log_dir() / f"{dep_id}-{replica}.log",
        cwd=Path(config.base_dir),
        start_timeout=dep.start_timeout or config.engines.start_timeout,
        served_names=tuple(names),
        vllm_ports=block,
        stall_timeout=stall_watch(config, dep)[0],
        alias_names=tuple(n for n in names if n not in (dep.served_as, dep.model, dep_id)),
        uds=uds,
    )


def process_key(spec: EngineSpec) -> tuple[object, ...]:
    """What makes the engine's process: two specs with the same key run the same engine
    (what differs, if anything, is the fleet's own: log file, timeouts, alias names)."""
    argv = list(spec.argv)
    names = list(spec.served_names)
    for i, part in enumerate(argv):
        if part == "--served-model-name" and argv[i + 1 : i + 1 + len(names)] == names:
            argv[i + 1 : i + 1 + len(names)] = [n for n in names if n not in spec.alias_names]
            break
    env = tuple(sorted(spec.env.items()))
    return (tuple(argv), env, spec.host, spec.port, spec.uds, spec.gpus, spec.cwd, spec.vllm_ports)


def _keep_prior(
    config: FleetConfig, inventory: Inventory, python: str, prior: Plan | None
) -> dict[tuple[str, int], EngineSpec]:
    """The engines of `prior` that the new file leaves as they are, by (deployment,
    replica): built again on their old port, GPUs and range, with the same process."""
    if prior is None:
        return {}
    kept: dict[tuple[str, int], EngineSpec] = {}
    declared = {config.gateway.port}
    for each in config.deployments.values():
        declared.update(engine_ports(each))
    known = set(inventory.indices) if inventory.gpus is not None else None
    sockets = socket_dir(config)
    for old in prior.engines:
        dep = config.deployments.get(old.deployment)
        if dep is None or dep.remote or old.replica >= dep.replicas:
            continue
        if (dep.listen == "uds") != (old.uds is not None):
            continue
        if old.uds is not None and old.uds.parent != sockets:
            continue  # engines.socket_dir moved
        fixed = engine_ports(dep)
        if fixed and fixed[old.replica] != old.port:
            continue
        if not fixed and old.port is not None and old.port in declared:
            continue
        gpus = old.gpus
        if isinstance(dep.gpus, int):
            if (
                gpus is None
                or len(gpus) != dep.gpus
                or (known is not None and not known >= set(gpus))
            ):
                continue
        elif isinstance(dep.gpus, list):
            share = len(dep.gpus) // dep.replicas
            gpus = tuple(dep.gpus[old.replica * share : (old.replica + 1) * share])
        else:
            gpus = None
        block = old.vllm_ports
        if ("VLLM_PORT" in dep.env) != (block is None):
            continue
        if block is not None and (declared & set(block)):
            continue
        again = _engine_spec(
            config, old.deployment, old.replica, python, old.port, gpus, block, old.uds,
            old.argv,
        )  # fmt: skip
        if process_key(again) == process_key(old):
            kept[(old.deployment, old.replica)] = again
    return kept


def served_names(dep_id: str, dep: Deployment) -> list[str]:
    """`--served-model-name` values: `served_name` (default: the model code) first, as
    responses carry it, then the model code, id and aliases, so the engine accepts every
    name a client may use."""
    names = [dep.served_as, dep.model, dep_id, *dep.aliases]
    return list(dict.fromkeys(names))


def engine_argv(
    config: FleetConfig,
    dep_id: str,
    dep: Deployment,
    port: int | None,
    python: str,
    uds: Path | None = None,
    lora: LoraFlags = NO_LORA,
) -> list[str]:
    """The engine's command line: the template's placeholders filled in; then, when the
    template does not place them, `--uds PATH` (on a socket) or `--host H --port P`;
    then the fleet's own flags (LoRA's from lora.py) and the deployment's `args`."""
    template = _template(config, dep)
    values = {
        "model": dep.model,
        "host": dep.host,
        "port": str(port) if port is not None else "",
        "uds": str(uds) if uds is not None else "",
        "python": python,
        "id": dep_id,
    }
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], part) for part in template]
    joined = " ".join(template)
    if uds is not None:
        if "{uds}" not in joined:
            argv += ["--uds", str(uds)]
    else:
        if "{host}" not in joined:
            argv += ["--host", dep.host]
        if "{port}" not in joined:
            argv += ["--port", str(port)]
    argv += ["--served-model-name", *served_names(dep_id, dep)]
    if runs_vllm(template) and not any(flag_name(a) == "--shutdown-timeout" for a in dep.args):
        # On SIGTERM vLLM then lets its requests in flight finish (for this long) instead of
        # aborting them; the gateway drains first, so this covers what the drain cut off.
        argv += ["--shutdown-timeout", f"{math.ceil(config.engines.drain_timeout)}"]
    if dep.sleep and not any(flag_name(a) == "--enable-sleep-mode" for a in dep.args):
        argv.append("--enable-sleep-mode")  # `sleep: 1|2`: unloaded by /sleep, not stopped
    argv += lora.args
    argv += dep.args
    return argv


def _template(config: FleetConfig, dep: Deployment) -> list[str]:
    return dep.command if dep.command is not None else config.engine_command


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
    template = _template(config, dep)
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
    lora: LoraFlags = NO_LORA,
) -> dict[str, str]:
    env = dict(dep.env)
    env.update(lora.env)
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
    if dep.sleep:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM's /sleep and /wake_up are dev routes
    return env
