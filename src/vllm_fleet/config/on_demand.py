"""The fleet file's rules for on-demand deployments (`start: on_demand`) and their swap
groups.

Pure: `check_on_demand(config)` returns every problem found (`checks.check` calls it).
`swap_components` joins on-demand deployments into swap groups from their GPUs and
names; the load checks run it on the GPUs the file lists, the plan on the planned ones.
The GPU overlap rules themselves (who may list a GPU another lists) stay in `checks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vllm_fleet.config.models import FleetConfig
from vllm_fleet.config.problems import ConfigIssue, Loc

# The keys that mean something only for `start: on_demand`.
ON_DEMAND_KEYS = (
    "idle_timeout",
    "sleep",
    "swap_group",
    "queue_timeout",
    "max_queued",
    "swap_drain_timeout",
    "min_hold",
)


def check_on_demand(config: FleetConfig) -> list[ConfigIssue]:
    """On-demand keys only where they apply; one swap group name per group."""
    issues: list[ConfigIssue] = []
    for dep_id, dep in config.deployments.items():
        at: Loc = ("deployments", dep_id)
        written = [key for key in ON_DEMAND_KEYS if key in dep.model_fields_set]
        if dep.remote:
            if dep.on_demand:
                issues.append(
                    ConfigIssue(
                        loc=(*at, "start"),
                        message="a deployment with `endpoints` is already running elsewhere: "
                        "the fleet never starts or stops it, on demand or otherwise; remove "
                        "`start: on_demand` (or remove `endpoints` to have the fleet start "
                        "it on demand)",
                    )
                )
            issues.extend(
                ConfigIssue(
                    loc=(*at, key),
                    message="a deployment with `endpoints` is never started, stopped or "
                    f"swapped by the fleet; remove `{key}`",
                )
                for key in written
            )
        elif not dep.on_demand:
            issues.extend(
                ConfigIssue(
                    loc=(*at, key),
                    message=f"`{key}` only applies to `start: on_demand`; set `start: "
                    "on_demand` or remove it",
                )
                for key in written
            )
    listed = {
        dep_id: dep.gpus for dep_id, dep in config.deployments.items() if isinstance(dep.gpus, list)
    }
    issues.extend(group_name_issues(config, swap_components(config, listed)))
    return issues


def swap_components(config: FleetConfig, gpus: Mapping[str, Iterable[int]]) -> list[list[str]]:
    """The on-demand deployments the fleet starts, joined when their GPUs (`gpus`, by
    deployment) overlap or their `swap_group` names are the same, directly or through
    others: each component in fleet-file order, the components by their first member.
    A component of one is a deployment alone (no swap group)."""
    order = [d for d, dep in config.deployments.items() if dep.on_demand and not dep.remote]
    rank = {dep_id: index for index, dep_id in enumerate(order)}
    parent = {dep_id: dep_id for dep_id in order}

    def root(dep_id: str) -> str:
        while parent[dep_id] != dep_id:
            parent[dep_id] = parent[parent[dep_id]]
            dep_id = parent[dep_id]
        return dep_id

    def join(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:  # the earlier member stays the root
            first, later = (ra, rb) if rank[ra] < rank[rb] else (rb, ra)
            parent[later] = first

    first_on: dict[int | str, str] = {}  # a GPU index or a group name -> its first member
    for dep_id in order:
        name = config.deployments[dep_id].swap_group
        keys: list[int | str] = [*gpus.get(dep_id, ())]
        keys += [name] if name is not None else []
        for key in keys:
            join(dep_id, first_on.setdefault(key, dep_id))
    components: dict[str, list[str]] = {}
    for dep_id in order:
        components.setdefault(root(dep_id), []).append(dep_id)
    return list(components.values())


def group_name_issues(config: FleetConfig, components: list[list[str]]) -> list[ConfigIssue]:
    """A swap group has one name: members joined by their GPUs may not name two groups."""
    issues: list[ConfigIssue] = []
    for members in components:
        named = [m for m in members if config.deployments[m].swap_group is not None]
        if not named:
            continue
        first = named[0]
        name = config.deployments[first].swap_group
        for member in named[1:]:
            other = config.deployments[member].swap_group
            if other == name:
                continue
            issues.append(
                ConfigIssue(
                    loc=("deployments", member, "swap_group"),
                    message=f"swap group `{other}`, but `{member}` shares GPUs with "
                    f"`{first}` of swap group `{name}` (directly or through other on-demand "
                    "deployments on them), so they take turns in one group; give them one "
                    f"name (`swap_group: {name}`), or remove `swap_group` here",
                )
            )
    return issues
