"""Pure: the plan's swap groups, its warnings about sleep mode, and what `fleet check`
says about on-demand deployments.

A swap group is on-demand deployments (`start: on_demand`) that take turns on the same
GPUs: at most one of them holds the GPUs at a time. They are joined when their planned
GPUs overlap (GPUs counted by number as planned) or when they name the same
`swap_group`, directly or through other members (`config.on_demand.swap_components`).
An on-demand deployment alone is no group: it just loads when asked for.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass

from vllm_fleet.config import ConfigIssue, FleetConfig
from vllm_fleet.config.on_demand import group_name_issues, swap_components
from vllm_fleet.gpus import Inventory


@dataclass(frozen=True)
class SwapGroup:
    """On-demand deployments taking turns on GPUs: one of them holds them at a time."""

    name: str  # the members' `swap_group`, else from the GPUs they share: gpu0, gpu0+1
    members: tuple[str, ...]  # deployment ids, in fleet-file order
    gpus: tuple[int, ...]  # the GPUs they share (union, sorted); () for a named group without

    def describe(self) -> str:
        gpus = f"GPUs {','.join(map(str, self.gpus))}" if self.gpus else "no GPUs pinned"
        return (
            f"swap group {self.name}: {gpus}; members: {', '.join(self.members)} "
            "(one loaded at a time)"
        )


def swap_groups(
    config: FleetConfig,
    planned: Mapping[tuple[str, int], tuple[int, ...]],
    issues: list[ConfigIssue],
) -> tuple[SwapGroup, ...]:
    """The swap groups of the planned GPUs (`planned`: by (deployment, replica)), in the
    order of their first members. Names two groups would share go to `issues`."""
    by_deployment: dict[str, set[int]] = {}
    for (dep_id, _), gpus in planned.items():
        by_deployment.setdefault(dep_id, set()).update(gpus)
    components = [c for c in swap_components(config, by_deployment) if len(c) > 1]
    issues.extend(group_name_issues(config, components))
    groups: list[SwapGroup] = []
    named_by: dict[str, str] = {}  # a group's own name -> its first member naming it
    for members in components:
        gpus = tuple(sorted({g for m in members for g in by_deployment.get(m, ())}))
        first = next((m for m in members if config.deployments[m].swap_group), None)
        name = config.deployments[first].swap_group if first else None
        groups.append(SwapGroup(name or "gpu" + "+".join(map(str, gpus)), tuple(members), gpus))
        if first is not None:
            named_by[groups[-1].name] = first
    for group in groups:
        first = named_by.get(group.name)
        if first is not None and first not in group.members:
            issues.append(
                ConfigIssue(
                    loc=("deployments", first, "swap_group"),
                    message=f"`{group.name}` is also the name the fleet gives the swap group "
                    f"{', '.join(f'`{m}`' for m in group.members)} form on the GPUs they "
                    "share; pick another name",
                )
            )
    return tuple(groups)


def sleep_warnings(config: FleetConfig, inventory: Inventory, vllm: Container[str]) -> list[str]:
    """What may go wrong with `sleep: 1|2` on an engine that runs vLLM (its id in `vllm`):
    no GPU to sleep on, and vLLM's dev routes (which sleep mode needs) open on TCP."""
    warnings = []
    for dep_id, dep in config.deployments.items():
        if dep.remote or not dep.sleep or dep_id not in vllm:
            continue
        if not inventory.gpus:
            seen = f"finds no GPU ({inventory.reason})" if inventory.reason else "finds no GPU"
            warnings.append(
                f"`{dep_id}` has `sleep: {dep.sleep}` and this machine's GPU inventory "
                f"{seen}: vLLM's sleep mode needs a GPU (CUDA/ROCm/XPU): the CPU build "
                "refuses --enable-sleep-mode; use sleep: 0 here"
            )
        if dep.listen == "tcp":
            warnings.append(
                f"`{dep_id}` has `sleep: {dep.sleep}`, which starts vLLM with "
                "VLLM_SERVER_DEV_MODE=1: its dev routes (/sleep, /wake_up, /collective_rpc, "
                f"...) are open to whoever reaches the engine's TCP port on {dep.host}; remove "
                "`listen: tcp` to keep it on a Unix socket only the fleet's user can open"
            )
    return warnings


def on_demand_lines(config: FleetConfig, groups: tuple[SwapGroup, ...]) -> list[str]:
    """What `fleet check` prints about on-demand deployments: each swap group (its name,
    GPUs, members), then per deployment what a request does, when it is unloaded, and
    its queue. No line when there is no on-demand deployment."""
    ids = [d for d, dep in config.deployments.items() if dep.on_demand and not dep.remote]
    if not ids:
        return []
    lines = ["on-demand deployments (started by their first request, not with the fleet):"]
    lines.extend(group.describe() for group in groups)
    group_of = {m: group for group in groups for m in group.members}
    for dep_id in ids:
        dep = config.deployments[dep_id]
        group = group_of.get(dep_id)
        timeout = dep.start_timeout or config.engines.start_timeout
        cold = f"cold start (start_timeout {timeout:g}s)"
        if dep.sleep:
            reload = " (its weights read again)" if dep.sleep == 2 else ""
            ask = f"wake from sleep level {dep.sleep}{reload}; the first time, {cold}"
            unload = f"slept at level {dep.sleep}"
        else:
            ask, unload = cold, "unloaded"
        if dep.idle_timeout is not None:
            idle = f"{unload} after {dep.idle_timeout:g}s idle"
        elif group is not None:
            idle = "kept loaded until another member needs the GPUs"
        else:
            idle = "kept loaded once started (no idle_timeout)"
        queue = (
            f"queues up to {dep.max_queued} requests for {dep.queue_timeout:g}s"
            if dep.max_queued
            else "queues no requests (max_queued: 0)"
        )
        lines.append(f"{dep_id}" + (f" (swap group {group.name})" if group else ""))
        lines.append(f"  on request: {ask}")
        lines.append(f"  when idle: {idle}")
        lines.append(f"  {queue}")
        if group is not None:
            lines.append(
                f"  swapped out: {unload} once its requests had {dep.swap_drain_timeout:g}s to "
                f"finish; once loaded it keeps its turn at least {dep.min_hold:g}s"
            )
    return lines
