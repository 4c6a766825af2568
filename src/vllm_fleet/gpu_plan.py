"""Pure: which GPUs each engine of a plan gets: as listed in the fleet file, split
between replicas, or counted from the inventory's free ones; kept for engines a reload
keeps, new ones first on GPUs no running engine holds (plan.py builds the plan from these)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from vllm_fleet.config import ConfigIssue, Deployment, FleetConfig
from vllm_fleet.gpus import Inventory


class Held(Protocol):
    """A running engine's GPUs (plan.EngineSpec)."""

    @property
    def gpus(self) -> tuple[int, ...] | None: ...


def assign_gpus(
    config: FleetConfig,
    inventory: Inventory,
    issues: list[ConfigIssue],
    warnings: list[str],
    kept: Mapping[tuple[str, int], Held],
    held: Sequence[Held],
) -> dict[tuple[str, int], tuple[int, ...]]:
    """GPUs as listed, split between replicas; counted ones from the GPUs nobody lists:
    kept engines keep theirs, the others take first the GPUs no running engine holds
    (so a replacement can start beside the engine it replaces), then any left."""
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
    for key, spec in kept.items():
        dep = config.deployments[key[0]]
        if isinstance(dep.gpus, int) and spec.gpus is not None:
            plan[key] = spec.gpus
            used.update(spec.gpus)
    running = {g for e in held for g in e.gpus or ()}
    # Free GPUs no running engine holds first, then those a running engine holds.
    free = sorted((i for i in known or () if i not in used), key=lambda i: (i in running, i))
    for dep_id, dep in counted:
        assert isinstance(dep.gpus, int)
        for replica in range(dep.replicas):
            if (dep_id, replica) in plan:
                continue
            if len(free) < dep.gpus:
                issues.append(
                    ConfigIssue(
                        loc=("deployments", dep_id, "gpus"),
                        message=f"replica {replica} needs {dep.gpus} GPU(s) but only "
                        f"{len(free)} are left unassigned on this machine "
                        f"(GPUs {', '.join(map(str, sorted(known or ())))}); lower the count "
                        "or the replicas"
                        + (
                            "; on-demand deployments take turns on GPUs they list by "
                            "index (`gpus: [0]`): a GPU count never shares"
                            if dep.on_demand
                            else ""
                        ),
                    )
                )
                break
            plan[(dep_id, replica)] = tuple(sorted(free[: dep.gpus]))
            free = free[dep.gpus :]
    return plan
