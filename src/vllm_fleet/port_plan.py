"""Pure: the TCP ports of a plan's engines (`listen: tcp`) and their VLLM_PORT ranges
(the ports vLLM's own processes talk on), kept for engines a reload keeps, new ones
clear of every port the file names and the running engines hold (plan.py builds the
plan from these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from vllm_fleet.config import ConfigIssue, FleetConfig
from vllm_fleet.config.checks import engine_ports, vllm_port_blocks

# Linux's default ephemeral ports (net.ipv4.ip_local_port_range): outgoing connections
# take ports here at random, so a VLLM_PORT range inside it can lose a port to one.
EPHEMERAL_PORTS = range(32768, 61000)


class Held(Protocol):
    """A running engine's ports (plan.EngineSpec)."""

    @property
    def port(self) -> int | None: ...
    @property
    def vllm_ports(self) -> range | None: ...


def vllm_port_warnings(config: FleetConfig, blocks: dict[tuple[str, int], range]) -> list[str]:
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


def _ports_in_use(config: FleetConfig, held: Sequence[Held]) -> set[int]:
    """The ports the file declares (the gateway's, fixed engine ports) and those the
    running engines hold (their serving ports and VLLM_PORT ranges)."""
    used = {config.gateway.port}
    for dep in config.deployments.values():
        used.update(engine_ports(dep))
    for engine in held:
        if engine.port is not None:
            used.add(engine.port)
        if engine.vllm_ports is not None:
            used.update(engine.vllm_ports)
    return used


def assign_vllm_ports(
    config: FleetConfig,
    issues: list[ConfigIssue],
    kept: Mapping[tuple[str, int], Held],
    held: Sequence[Held],
) -> dict[tuple[str, int], range]:
    """Each local engine's VLLM_PORT range: the kept engines' own; without a running
    plan, one after another in file order (`vllm_port_blocks`); on a reload, the first
    ranges from `engines.vllm_port_base` that no running engine holds and that hold no
    port the file declares or a running engine listens on."""
    if not held:
        return vllm_port_blocks(config)
    wanted = vllm_port_blocks(config)  # which engines get one, and how wide
    span, base = config.engines.vllm_port_span, config.engines.vllm_port_base
    busy = _ports_in_use(config, held) | {config.engines.base_port}
    blocks: dict[tuple[str, int], range] = {}
    for key in wanted:
        if key in kept and kept[key].vllm_ports is not None:
            blocks[key] = kept[key].vllm_ports  # type: ignore[assignment]
    slot = 0
    for key in wanted:
        if key in blocks:
            continue
        while True:
            block = range(base + slot * span, base + (slot + 1) * span)
            slot += 1
            if block.stop - 1 > 65535:
                issues.append(
                    ConfigIssue(
                        loc=("engines", "vllm_port_base"),
                        message=f"no VLLM_PORT range of {span} ports left below 65536 for "
                        f"`{key[0]}` replica {key[1]} beside the running engines; lower "
                        "engines.vllm_port_base or engines.vllm_port_span",
                    )
                )
                return blocks
            if busy.isdisjoint(block) and all(
                b.stop <= block.start or block.stop <= b.start for b in blocks.values()
            ):
                blocks[key] = block
                break
    return blocks


def assign_ports(
    config: FleetConfig,
    issues: list[ConfigIssue],
    blocks: dict[tuple[str, int], range],
    kept: Mapping[tuple[str, int], Held],
    held: Sequence[Held],
) -> dict[tuple[str, int], int]:
    """Fixed ports as written; kept engines' as they are; the rest counted up from
    `engines.base_port`, skipping every port the file names (including the gateway's),
    the VLLM_PORT ranges, and the ports of the running engines (`held`)."""
    taken = _ports_in_use(config, held)
    for block in blocks.values():
        taken.update(block)
    ports = {key: spec.port for key, spec in kept.items() if spec.port is not None}
    next_port = config.engines.base_port
    for dep_id, dep in config.deployments.items():
        if dep.remote or dep.listen == "uds":
            continue
        fixed = engine_ports(dep)
        for replica in range(dep.replicas):
            if (dep_id, replica) in ports:
                continue
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
