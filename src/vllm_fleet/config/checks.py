"""Fleet-file rules that span fields or deployments (ids, ports, GPUs, names, flags).

Pure: `check(config)` takes the validated models and returns every problem found;
`loading.py` raises them together with the models' own.
"""

from __future__ import annotations

import re
from typing import Literal

from vllm_fleet.config.access import check_keys
from vllm_fleet.config.adapters import check_adapters
from vllm_fleet.config.flags import flag_name, flag_value
from vllm_fleet.config.models import ID_MAX_LEN, ID_PATTERN, Deployment, FleetConfig
from vllm_fleet.config.on_demand import check_on_demand
from vllm_fleet.config.problems import ConfigIssue, Loc

# First path segments the gateway answers itself; a deployment id may not shadow them.
RESERVED_IDS = frozenset(
    {"v1", "v2", "openai", "health", "metrics", "fleet", "ping", "version", "docs", "api"}
)
# Engine flags the fleet sets itself; passing them in `args` would fight the launcher.
OWNED_FLAGS = {
    "--host": "set `host:` on the deployment instead (engines bind 127.0.0.1 by default)",
    "--port": "set `port:` on the deployment instead",
    "--uds": "engines listen on a Unix socket in engines.socket_dir by default "
    "(`listen: uds`); the fleet passes `--uds` itself",
    "--served-model-name": "the fleet serves the model code, the id and `aliases:`; "
    "add extra names to `aliases:`",
}
PLACEHOLDERS = ("model", "host", "port", "uds", "python", "id")
# vLLM's default `--gpu-memory-utilization`: the fraction of the whole card one engine takes.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Kind = Literal["id", "model", "alias"]


def engine_ports(dep: Deployment) -> list[int]:
    """Ports fixed in the file for a deployment's replicas (consecutive from `port`)."""
    if dep.port is None or dep.remote or dep.listen == "uds":
        return []
    return [dep.port + i for i in range(dep.replicas)]


def vllm_port_blocks(config: FleetConfig) -> dict[tuple[str, int], range]:
    """Each local engine's own block of ports for vLLM's internal ports, by (deployment,
    replica): VLLM_PORT is the block's first port. Blocks follow one another from
    `engines.vllm_port_base`, `engines.vllm_port_span` ports each, in file order; an
    engine whose deployment's `env` sets VLLM_PORT itself gets none (its value wins).

    Why a block, and how wide (vLLM 0.32, vllm/utils/network_utils.py): with VLLM_PORT
    set, `get_open_port()` returns the first port at or above VLLM_PORT that it can bind
    (it binds, releases, and the caller binds again later), and `get_open_ports_list(5)`
    takes five ports upward from it. An engine asks for one port per torch.distributed
    TCPStore it opens (the Ray executor's, ROCm's AITER all-reduce's), five more with
    data parallelism, tensor-parallel-size + 1 with fault tolerance: under 20 even on
    8 GPUs. 100 leaves room for ports already taken (the scan skips them) without
    reaching the next engine's block. Without VLLM_PORT every engine takes these ports
    from the kernel's ephemeral range, and between the release and the bind another
    engine starting at the same moment can take the same port (vLLM #39015, #43206);
    with one VLLM_PORT inherited by every engine, two engines find the same first free
    port for certain."""
    engines = config.engines
    blocks: dict[tuple[str, int], range] = {}
    start = engines.vllm_port_base
    for dep_id, dep in config.deployments.items():
        if dep.remote or "VLLM_PORT" in dep.env:
            continue
        for replica in range(dep.replicas):
            blocks[(dep_id, replica)] = range(start, start + engines.vllm_port_span)
            start += engines.vllm_port_span
    return blocks


def check(config: FleetConfig) -> list[ConfigIssue]:
    """Checks that span fields or deployments; pure, returns every problem found."""
    issues: list[ConfigIssue] = []
    add = issues.append
    if not config.deployments:
        add(ConfigIssue(loc=("deployments",), message="add at least one deployment"))
    issues.extend(_check_template(config.engine_command, ("engine_command",)))
    issues.extend(check_keys(config))

    port_owner: dict[int, str] = {config.gateway.port: "the gateway (gateway.port)"}
    gpu_users: dict[int, list[str]] = {}  # GPU index -> deployments pinned to it, in order

    for dep_id, dep in config.deployments.items():
        at: Loc = ("deployments", dep_id)
        issues.extend(_check_id(dep_id, at))
        if dep.remote:
            for key in (
                "gpus",
                "share_gpus",
                "args",
                "env",
                "host",
                "port",
                "command",
                "stall_timeout",
                "listen",
            ):
                if key in dep.model_fields_set:
                    add(
                        ConfigIssue(
                            loc=(*at, key),
                            message="a deployment with `endpoints` is already running "
                            "elsewhere and is never started by the fleet; remove "
                            f"`{key}` (or remove `endpoints` to have the fleet start it)",
                        )
                    )
            if "start_timeout" in dep.model_fields_set:
                add(
                    ConfigIssue(
                        loc=(*at, "start_timeout"),
                        message="a deployment with `endpoints` is never started by the fleet; "
                        "remove `start_timeout`",
                    )
                )
            if "replicas" in dep.model_fields_set:
                add(
                    ConfigIssue(
                        loc=(*at, "replicas"),
                        message="with `endpoints`, each URL is one replica; remove `replicas`",
                    )
                )
            continue
        if "endpoints" in dep.model_fields_set:
            add(
                ConfigIssue(
                    loc=(*at, "endpoints"),
                    message="`endpoints` is empty; list the URLs of engines already running, "
                    "or remove `endpoints` to have the fleet start this one",
                )
            )
        if dep.command is not None:
            issues.extend(_check_template(dep.command, (*at, "command")))
        issues.extend(_check_listen(config, dep_id, dep))
        for index, arg in enumerate(dep.args):
            flag = flag_name(arg)
            if flag in OWNED_FLAGS:
                add(
                    ConfigIssue(
                        loc=(*at, "args", index),
                        message=f"`{flag}` is set by the fleet; {OWNED_FLAGS[flag]}",
                    )
                )
        if "CUDA_VISIBLE_DEVICES" in dep.env and dep.gpus is not None:
            add(
                ConfigIssue(
                    loc=(*at, "env", "CUDA_VISIBLE_DEVICES"),
                    message="`gpus:` sets CUDA_VISIBLE_DEVICES; remove one of the two",
                )
            )
        # ports
        for replica, port in enumerate(engine_ports(dep)):
            if port > 65535:
                add(
                    ConfigIssue(
                        loc=(*at, "port"),
                        message=f"replica {replica} would get port {port}, past 65535; "
                        "lower `port`",
                    )
                )
                continue
            owner = port_owner.get(port)
            who = f"deployment `{dep_id}`" + (f" replica {replica}" if dep.replicas > 1 else "")
            if owner:
                add(
                    ConfigIssue(
                        loc=(*at, "port"),
                        message=f"port {port} is already taken by {owner}; pick another port "
                        "or leave `port` out to have one chosen",
                    )
                )
            else:
                port_owner[port] = who
        # gpus
        issues.extend(_check_utilization(dep, at))
        if isinstance(dep.gpus, list):
            if len(set(dep.gpus)) != len(dep.gpus):
                add(ConfigIssue(loc=(*at, "gpus"), message="a GPU index is listed twice"))
            if len(dep.gpus) == 0:
                add(
                    ConfigIssue(
                        loc=(*at, "gpus"),
                        message="an empty list pins the engine to no GPU; remove `gpus` "
                        "to leave CUDA_VISIBLE_DEVICES unset",
                    )
                )
            elif len(dep.gpus) % dep.replicas:
                add(
                    ConfigIssue(
                        loc=(*at, "gpus"),
                        message=f"{len(dep.gpus)} GPUs cannot be split evenly over "
                        f"{dep.replicas} replicas; list a multiple of {dep.replicas} GPUs "
                        "(each replica takes the next equal share) or give a count per "
                        "replica, e.g. `gpus: 1`",
                    )
                )
            for index, gpu in enumerate(dep.gpus):
                users = gpu_users.setdefault(gpu, [])
                if dep_id in users:
                    continue  # listed twice in this deployment: reported above
                # A GPU is shared only when every deployment on it says it shares, or
                # swapped between on-demand ones (one holds it at a time).
                blocker = next(
                    (u for u in users if not _may_share(dep, config.deployments[u])), None
                )
                if blocker is not None:
                    add(
                        ConfigIssue(
                            loc=(*at, "gpus", index),
                            message=f"GPU {gpu} is already used by deployment `{blocker}`; "
                            "give each deployment its own GPUs, or let both share it: set "
                            "`share_gpus: true` and `--gpu-memory-utilization` (e.g. 0.45) "
                            "on both, or make both `start: on_demand` to swap them on this GPU",
                        )
                    )
                    continue
                users.append(dep_id)
                issues.extend(_check_shared_memory(config, gpu, users, (*at, "gpus", index)))
        issues.extend(_check_parallelism(dep, at))
    issues.extend(_check_names(config))
    for a_id in config.adapters:
        issues.extend(_check_id(a_id, ("deployments", a_id)))
    issues.extend(check_adapters(config))
    issues.extend(_check_vllm_ports(config))
    issues.extend(check_on_demand(config))
    return issues


def _check_vllm_ports(config: FleetConfig) -> list[ConfigIssue]:
    """The engines' VLLM_PORT blocks fit below 65536 and hold no port the file declares
    (the gateway's, a deployment's, `engines.base_port`); a VLLM_PORT in `env` is a port."""
    issues: list[ConfigIssue] = []
    for dep_id, dep in config.deployments.items():
        value = dep.env.get("VLLM_PORT")
        if value is not None and not (value.isdigit() and 1 <= int(value) <= 65535):
            issues.append(
                ConfigIssue(
                    loc=("deployments", dep_id, "env", "VLLM_PORT"),
                    message=f"VLLM_PORT {value!r} is not a port number (vLLM fails at "
                    "start); give a port, e.g. 25000, or remove it to have the fleet "
                    "give each engine its own range",
                )
            )
    blocks = vllm_port_blocks(config)
    if not blocks:
        return issues
    first = min(b.start for b in blocks.values())
    last = max(b.stop for b in blocks.values()) - 1
    span = f"{first}-{last}"
    if last > 65535:
        issues.append(
            ConfigIssue(
                loc=("engines", "vllm_port_base"),
                message=f"the VLLM_PORT ranges of {len(blocks)} engine(s), "
                f"{config.engines.vllm_port_span} ports each from {first}, run past 65535; "
                "lower engines.vllm_port_base or engines.vllm_port_span",
            )
        )
        return issues
    declared: list[tuple[Loc, int]] = [(("gateway", "port"), config.gateway.port)]
    declared.append((("engines", "base_port"), config.engines.base_port))
    for dep_id, dep in config.deployments.items():
        declared.extend((("deployments", dep_id, "port"), p) for p in engine_ports(dep))
    reported: set[Loc] = set()
    for loc, port in declared:
        hit = next((key for key, block in blocks.items() if port in block), None)
        if hit is None or loc in reported:
            continue
        reported.add(loc)
        block = blocks[hit]
        issues.append(
            ConfigIssue(
                loc=loc,
                message=f"port {port} lies in {block.start}-{block.stop - 1}, the range of "
                f"vLLM's internal ports (VLLM_PORT) of engine `{hit[0]}-{hit[1]}`; the "
                f"engines' ranges take {span} (engines.vllm_port_base, vllm_port_span): "
                "pick a port outside them, or move them with engines.vllm_port_base",
            )
        )
    return issues


def _check_id(dep_id: str, at: Loc) -> list[ConfigIssue]:
    if not ID_PATTERN.fullmatch(dep_id):
        return [
            ConfigIssue(
                loc=at,
                message=f"deployment id `{dep_id}` is not URL-safe; use at most {ID_MAX_LEN} "
                "lowercase letters, digits, `.`, `_` and `-`, starting with a letter or digit "
                f"(for example `{_suggest_id(dep_id)}`)",
            )
        ]
    if dep_id in RESERVED_IDS:
        return [
            ConfigIssue(
                loc=at,
                message=f"deployment id `{dep_id}` is reserved by the gateway "
                f"({', '.join(sorted(RESERVED_IDS))}); pick another id",
            )
        ]
    return []


def _check_names(config: FleetConfig) -> list[ConfigIssue]:
    """Every name a client may send as `model` leads to one deployment: an alias may not
    be another deployment's id, model code or alias, nor a model code another's id."""
    issues: list[ConfigIssue] = []
    owners: dict[str, tuple[str, Kind]] = {dep_id: (dep_id, "id") for dep_id in config.deployments}
    # Two deployments may serve the same model code (the gateway then asks for an id).
    for dep_id, dep in config.deployments.items():
        owners.setdefault(dep.model, (dep_id, "model"))
    for dep_id, dep in config.deployments.items():
        other = owners.get(dep.model)
        if other and other[0] != dep_id and other[1] == "id":
            issues.append(
                ConfigIssue(
                    loc=("deployments", dep_id, "model"),
                    message=f"model code `{dep.model}` is also the id of deployment "
                    f"`{other[0]}`; rename that id",
                )
            )
        names: list[tuple[Loc, str, str]] = [
            (("aliases", index), alias, "alias") for index, alias in enumerate(dep.aliases)
        ]
        if dep.served_name is not None:
            names.insert(0, (("served_name",), dep.served_name, "served name"))
        for where, alias, kind in names:
            if alias in (dep_id, dep.model):
                continue
            other = owners.get(alias)
            if other and other[0] != dep_id:
                what = "model code" if other[1] == "model" else other[1]
                issues.append(
                    ConfigIssue(
                        loc=("deployments", dep_id, *where),
                        message=f"{kind} `{alias}` is already the {what} of deployment "
                        f"`{other[0]}`; clients could not tell them apart, pick another {kind}",
                    )
                )
            else:
                owners[alias] = (dep_id, "alias")
    return issues


def _shares(dep: Deployment) -> bool:
    return dep.share_gpus or flag_value(dep.args, "--gpu-memory-utilization") is not None


def _may_share(dep: Deployment, other: Deployment) -> bool:
    return (dep.on_demand and other.on_demand) or (_shares(dep) and _shares(other))


def _utilization(dep: Deployment) -> float:
    value = flag_value(dep.args, "--gpu-memory-utilization")
    try:
        return float(value) if value is not None else DEFAULT_GPU_MEMORY_UTILIZATION
    except ValueError:
        return DEFAULT_GPU_MEMORY_UTILIZATION  # reported by _check_utilization


def _check_utilization(dep: Deployment, at: Loc) -> list[ConfigIssue]:
    value = flag_value(dep.args, "--gpu-memory-utilization")
    if value is None:
        return []
    try:
        ok = 0 < float(value) <= 1
    except ValueError:
        ok = False
    if ok:
        return []
    return [
        ConfigIssue(
            loc=(*at, "args"),
            message=f"--gpu-memory-utilization {value!r} is not a fraction of the GPU's memory; "
            "give a number above 0 and at most 1, e.g. 0.45",
        )
    ]


def _check_shared_memory(
    config: FleetConfig, gpu: int, users: list[str], at: Loc
) -> list[ConfigIssue]:
    """Engines sharing a GPU each take their --gpu-memory-utilization of the whole card;
    of the on-demand ones on it (they take turns: one loaded at a time), the largest."""
    swapping = [u for u in users if config.deployments[u].on_demand]
    counted = [u for u in users if u not in swapping]
    if swapping:
        counted.append(max(swapping, key=lambda u: _utilization(config.deployments[u])))
    total = sum(_utilization(config.deployments[u]) for u in counted)
    if len(counted) < 2 or total <= 1.0 + 1e-9:
        return []
    turns = ", ".join(f"`{u}`" for u in swapping)
    note = f" (of {turns}, which take turns on it, the largest)" if len(swapping) > 1 else ""
    return [
        ConfigIssue(
            loc=at,
            message=f"GPU {gpu} is shared by {', '.join(f'`{u}`' for u in counted)}, whose "
            f"--gpu-memory-utilization add up to {total:.2f} of the card{note} (an engine "
            f"without the flag takes {DEFAULT_GPU_MEMORY_UTILIZATION}); the later engine would "
            "run out of memory; set it on each so they add up to at most 1, e.g. 0.45 each",
        )
    ]


def _check_parallelism(dep: Deployment, at: Loc) -> list[ConfigIssue]:
    per_replica = dep.per_replica_gpus()
    tp = flag_value(dep.args, "--tensor-parallel-size", "-tp")
    pp = flag_value(dep.args, "--pipeline-parallel-size", "-pp")
    dp = flag_value(dep.args, "--data-parallel-size", "-dp")
    if per_replica is None or (tp is None and pp is None and dp is None):
        return []
    try:
        wanted = int(tp or 1) * int(pp or 1) * int(dp or 1)
    except ValueError:
        return [
            ConfigIssue(
                loc=(*at, "args"),
                message="--tensor-parallel-size / --pipeline-parallel-size / "
                "--data-parallel-size must be integers",
            )
        ]
    if wanted != per_replica:
        return [
            ConfigIssue(
                loc=(*at, "gpus"),
                message=f"each replica gets {per_replica} GPU(s) but the engine args ask for "
                f"{wanted} (tensor-parallel {tp or 1} × pipeline-parallel {pp or 1} × "
                f"data-parallel {dp or 1}); make them match, or vLLM will fail at start",
            )
        ]
    return []


def _check_listen(config: FleetConfig, dep_id: str, dep: Deployment) -> list[ConfigIssue]:
    """`listen: uds` (the default) needs a command that takes the socket: one placing
    `{uds}`, or one placing none of `{uds}`, `{host}`, `{port}` (the fleet adds `--uds
    PATH`, as for vLLM). A command placing `{port}` or `{host}` but not `{uds}` would start
    an engine on TCP that the gateway looks for on a socket. `listen: tcp` has no socket."""
    at: Loc = ("deployments", dep_id)
    own = dep.command is not None
    template = dep.command if dep.command is not None else config.engine_command
    where: Loc = (*at, "command") if own else ("engine_command",)
    joined = " ".join(template)
    placed = [p for p in ("host", "port") if f"{{{p}}}" in joined]
    if dep.listen == "tcp":
        if "{uds}" in joined:
            return [
                ConfigIssue(
                    loc=(*at, "listen"),
                    message=f"`listen: tcp` but the command{'' if own else ' (engine_command)'} "
                    "places `{uds}`; remove `{uds}` from the command, or remove `listen: tcp` "
                    "to listen on a Unix socket",
                )
            ]
        return []
    issues = []
    if placed and "{uds}" not in joined:
        names = " and ".join(f"`{{{p}}}`" for p in placed)
        issues.append(
            ConfigIssue(
                loc=where,
                message=f"deployment `{dep_id}` listens on a Unix socket (the default, "
                f"`listen: uds`) but the command places {names} and not `{{uds}}`: add "
                "`{uds}` where the engine takes its socket's path (vLLM: `--uds {uds}`) "
                "instead of the host and port, or set `listen: tcp` on the deployment",
            )
        )
    for key in ("host", "port"):
        if key in dep.model_fields_set and getattr(dep, key) is not None:
            issues.append(
                ConfigIssue(
                    loc=(*at, key),
                    message=f"the engine listens on a Unix socket (the default, `listen: "
                    f"uds`), not on a TCP {key}; remove `{key}`, or set `listen: tcp`",
                )
            )
    return issues


def _check_template(template: list[str], at: Loc) -> list[ConfigIssue]:
    issues = []
    if not template:
        return [ConfigIssue(loc=at, message="the command is empty; e.g. [vllm, serve, '{model}']")]
    for index, part in enumerate(template):
        for name in _PLACEHOLDER.findall(part):
            if name not in PLACEHOLDERS:
                issues.append(
                    ConfigIssue(
                        loc=(*at, index),
                        message=f"unknown placeholder `{{{name}}}`; known: "
                        + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS),
                    )
                )
    return issues


def _suggest_id(dep_id: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", dep_id.lower()).strip("-._")
    return slug or "my-model"
