"""Pure: what a reload changes. The running plan and fleet file against the new ones
become `Changes`: per engine (and remote endpoint) keep, update in place, start, stop,
replace; the gateway keys that changed; and what cannot change without a restart.

- keep: the same engine (`plan.process_key`) with the same spec; nothing happens.
- update: the same process, other settings of the fleet's own (aliases, the log file,
  timeouts): the running engine is left alone and its next restart uses them.
- start / stop: a new deployment or replica; one removed (drained, then stopped).
- replace: a new engine for the same replica. `beside`: it starts on a port, a range and
  GPUs of its own while the old one serves, and takes over once ready; else the old one
  is drained and stopped first (it holds the GPUs or the port the new one needs).
- restart: an engine the file keeps as it is, but which had failed (given up after its
  restarts): started again, as the file may have been fixed around it.
- `after`: engines whose stop must come first, as they hold GPUs or the port it needs.
- adapters (LoRA): added, removed or changed ones are loaded into and unloaded from
  their base's running engines, which keep running (`AdapterStep`; lora.py keeps the
  base's flags stable, so only a rank over the running `--max-lora-rank` replaces it).

The order in which `engines/rollout.py` applies them is part of the decision: replicas
of one deployment are replaced one after another, never all at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vllm_fleet.config import Deployment, FleetConfig
from vllm_fleet.config.models import KeyConfig
from vllm_fleet.lora import why_new_engine
from vllm_fleet.plan import EngineSpec, Plan, RemoteSpec, process_key

Spec = EngineSpec | RemoteSpec


class Action(StrEnum):
    KEEP = "keep"
    UPDATE = "update"
    START = "start"
    STOP = "stop"
    REPLACE = "replace"
    RESTART = "restart"  # kept by the file, but it had failed: started again


@dataclass(frozen=True)
class Step:
    action: Action
    deployment: str
    replica: int
    old: Spec | None
    new: Spec | None
    why: str = ""  # which keys changed, in words
    beside: bool = False  # replace: the new engine starts while the old one serves
    after: tuple[str, ...] = ()  # names of engines to stop (drained) before this starts

    @property
    def name(self) -> str:
        return f"{self.deployment}-{self.replica}"

    @property
    def managed(self) -> bool:
        spec = self.new if self.new is not None else self.old
        return isinstance(spec, EngineSpec)

    def describe(self) -> str:
        """One line of the plan, e.g. `chat-0: replace (args changed); beside the old one`."""
        kind = "" if self.managed else " (remote endpoint)"
        text = f"{self.name}{kind}: {self.action.value}"
        if self.why:
            text += f" ({self.why})"
        if self.action is Action.REPLACE and self.managed:
            text += (
                "; the new engine starts beside the old one, which serves until it is ready"
                if self.beside
                else "; the old engine is drained and stopped first (the new one needs its "
                "GPUs or port): 503 with Retry-After meanwhile unless another replica serves"
            )
        elif self.action is Action.STOP and self.managed:
            text += "; out of routing now, drained, then stopped"
        if self.after:
            text += f"; starts once {', '.join(self.after)} stopped (its GPUs or port)"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "deployment": self.deployment,
            "replica": self.replica,
            "action": self.action.value,
            "why": self.why,
            "beside": self.beside,
            "after": list(self.after),
            "remote": not self.managed,
            "line": self.describe(),
        }


class AdapterAction(StrEnum):
    ADD = "add"  # loaded into every running engine of its base
    REMOVE = "remove"  # drained and unloaded
    CHANGE = "change"  # another directory (or base): unloaded, then loaded again


@dataclass(frozen=True)
class AdapterStep:
    action: AdapterAction
    adapter: str
    base: str  # where it is loaded (for REMOVE: where it was)
    why: str = ""

    def describe(self, restarts: bool = False) -> str:
        """In words; `restarts`: the reload restarts or replaces engines of its base."""
        what = {
            AdapterAction.ADD: f"loaded into the engines of `{self.base}`",
            AdapterAction.REMOVE: f"out of routing now, drained and unloaded from `{self.base}`",
            AdapterAction.CHANGE: f"unloaded and loaded again on `{self.base}`",
        }[self.action]
        why = f" ({self.why})" if self.why else ""
        how = "as they start again" if restarts else "no engine restarts"
        return f"{self.adapter} (adapter): {self.action.value}{why}; {what}, {how}"

    def as_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "action": self.action.value,
            "base": self.base,
            "why": self.why,
            "line": self.describe(),
        }


@dataclass(frozen=True)
class Changes:
    steps: tuple[Step, ...]
    gateway: tuple[str, ...] = ()  # gateway-only changes, in words, applied in place
    settings: tuple[str, ...] = ()  # engines.* settings applied to running engines in place
    refused: tuple[str, ...] = ()  # changes that need a restart of `fleet up`
    added: tuple[str, ...] = ()  # deployments new in the file
    removed: tuple[str, ...] = ()  # deployments gone from the file
    warnings: tuple[str, ...] = field(default=())
    adapters: tuple[AdapterStep, ...] = ()  # LoRA adapters loaded or unloaded in place

    @property
    def empty(self) -> bool:
        return (
            not self.gateway
            and not self.settings
            and not self.adapters
            and all(s.action is Action.KEEP for s in self.steps)
        )

    def touching(self) -> list[Step]:
        """The steps that do something (all but keep)."""
        return [s for s in self.steps if s.action is not Action.KEEP]

    def lines(self) -> list[str]:
        """The plan in words: per deployment, then the gateway's changes."""
        if self.refused:
            return [f"refused: {r}" for r in self.refused]
        out: list[str] = []
        by_dep: dict[str, list[Step]] = {}
        for step in self.steps:
            by_dep.setdefault(step.deployment, []).append(step)
        for dep_id, steps in by_dep.items():
            if all(s.action is Action.KEEP for s in steps):
                out.append(f"{dep_id}: unchanged ({len(steps)} replica(s) keep running)")
                continue
            label = (
                " (new)" if dep_id in self.added else " (removed)" if dep_id in self.removed else ""
            )
            out.append(f"{dep_id}{label}:")
            out.extend(f"  {s.describe()}" for s in steps)
        moving = {s.deployment for s in self.steps if s.action not in (Action.KEEP, Action.UPDATE)}
        out.extend(a.describe(a.base in moving) for a in self.adapters)
        out.extend(f"gateway: {g} (in place)" for g in self.gateway)
        out.extend(f"engines: {g} (in place, for every engine)" for g in self.settings)
        if self.empty:
            out.append("nothing to change: the running fleet is what the file says")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": [s.as_json() for s in self.steps],
            "gateway": list(self.gateway),
            "settings": list(self.settings),
            "refused": list(self.refused),
            "added": list(self.added),
            "removed": list(self.removed),
            "warnings": list(self.warnings),
            "adapters": [a.as_json() for a in self.adapters],
            "lines": self.lines(),
        }


def reconcile(
    current_config: FleetConfig,
    current: Plan,
    desired_config: FleetConfig,
    desired: Plan,
    failed: frozenset[str] = frozenset(),
) -> Changes:
    """What turns the running fleet (`current`) into the file's (`desired`); pure.
    `failed`: the names of the running engines that have failed for good."""
    refused = _listen_changes(current_config, desired_config)
    if refused:
        return Changes(steps=(), refused=tuple(refused))
    old_deps, new_deps = current_config.deployments, desired_config.deployments
    old_specs = _by_key(current)
    new_specs = _by_key(desired)
    stopping: list[Spec] = []  # engines that stop or are replaced
    steps: list[Step] = []
    for key in _ordered_keys(old_specs, new_specs, current_config, desired_config):
        old, new = old_specs.get(key), new_specs.get(key)
        dep_id, replica = key
        if new is None:
            assert old is not None
            why = _stop_reason(dep_id, replica, old_deps.get(dep_id), new_deps.get(dep_id))
            steps.append(Step(Action.STOP, dep_id, replica, old, None, why))
            stopping.append(old)
        elif old is None:
            why = _start_reason(dep_id, replica, old_deps.get(dep_id), new_deps[dep_id])
            steps.append(Step(Action.START, dep_id, replica, None, new, why))
        elif (old == new or _same_process(old, new)) and f"{dep_id}-{replica}" in failed:
            steps.append(Step(Action.RESTART, dep_id, replica, old, new, "it had failed"))
        elif old == new:
            steps.append(Step(Action.KEEP, dep_id, replica, old, new))
        else:
            why = _changed(current_config, desired_config, dep_id, old, new)
            if _same_process(old, new):
                steps.append(Step(Action.UPDATE, dep_id, replica, old, new, why))
            else:
                beside = not _conflict(old, new)
                steps.append(Step(Action.REPLACE, dep_id, replica, old, new, why, beside))
                stopping.append(old)
    # A start (or a replace) waits for the stop of every other engine whose GPUs or port
    # it needs; its own old engine is handled by `beside`.
    ordered: list[Step] = []
    for step in steps:
        if step.action in (Action.START, Action.REPLACE) and isinstance(step.new, EngineSpec):
            blockers = [
                f"{o.deployment}-{o.replica}"
                for o in stopping
                if o is not step.old and isinstance(o, EngineSpec) and _conflict(o, step.new)
            ]
            if blockers:
                step = Step(**{**step.__dict__, "after": tuple(blockers)})
        ordered.append(step)
    added = tuple(d for d in new_deps if d not in old_deps)
    removed = tuple(d for d in old_deps if d not in new_deps)
    gateway = _gateway_changes(current_config, desired_config)
    settings = _settings_changes(current_config, desired_config)
    adapters = adapter_steps(current_config, desired_config)
    return Changes(
        tuple(ordered), tuple(gateway), tuple(settings), (), added, removed, desired.warnings,
        tuple(adapters),
    )  # fmt: skip


def adapter_steps(old: FleetConfig, new: FleetConfig) -> list[AdapterStep]:
    """The adapters to load, unload or load again, in the new file's order (removed
    ones first). One that moves to another base is removed from the old one."""
    steps: list[AdapterStep] = []
    for a_id, before in old.adapters.items():
        gone = new.adapters.get(a_id)
        if gone is None:
            steps.append(
                AdapterStep(AdapterAction.REMOVE, a_id, before.base, "removed from the file")
            )
        elif gone.base != before.base:
            why = f"base {before.base} -> {gone.base}"
            steps.append(AdapterStep(AdapterAction.REMOVE, a_id, before.base, why))
    for a_id, now in new.adapters.items():
        was = old.adapters.get(a_id)
        if was is None:
            steps.append(AdapterStep(AdapterAction.ADD, a_id, now.base, "new"))
        elif was.base != now.base:
            why = f"base {was.base} -> {now.base}"
            steps.append(AdapterStep(AdapterAction.ADD, a_id, now.base, why))
        elif old.adapter_path(was) != new.adapter_path(now):
            why = f"adapter {was.adapter} -> {now.adapter}"
            steps.append(AdapterStep(AdapterAction.CHANGE, a_id, now.base, why))
    return steps


def _by_key(plan: Plan) -> dict[tuple[str, int], Spec]:
    found: dict[tuple[str, int], Spec] = {(e.deployment, e.replica): e for e in plan.engines}
    found.update({(r.deployment, r.replica): r for r in plan.remotes})
    return found


def _ordered_keys(
    old: dict[tuple[str, int], Spec],
    new: dict[tuple[str, int], Spec],
    old_config: FleetConfig,
    new_config: FleetConfig,
) -> list[tuple[str, int]]:
    """The new file's order, then what it dropped in the old file's order."""
    order = {d: i for i, d in enumerate(new_config.deployments)}
    tail = len(order)
    for dep_id in old_config.deployments:
        if dep_id not in order:
            order[dep_id] = tail
            tail += 1
    return sorted(set(old) | set(new), key=lambda k: (order.get(k[0], tail), k[1]))


def _same_process(old: Spec, new: Spec) -> bool:
    if isinstance(old, EngineSpec) and isinstance(new, EngineSpec):
        return process_key(old) == process_key(new)
    return False  # a remote endpoint's URL changed, or local became remote or back


def _conflict(old: Spec, new: Spec) -> bool:
    """Whether `new` needs what the running `old` holds: a GPU, its port or socket, its
    range."""
    if not (isinstance(old, EngineSpec) and isinstance(new, EngineSpec)):
        return False
    if old.gpus and new.gpus and set(old.gpus) & set(new.gpus):
        return True
    if old.port is not None and old.port == new.port:
        return True
    if old.uds is not None and old.uds == new.uds:
        return True
    if old.vllm_ports is not None and new.vllm_ports is not None:
        return (
            old.vllm_ports.start < new.vllm_ports.stop
            and new.vllm_ports.start < old.vllm_ports.stop
        )
    return False


def _listen_changes(old: FleetConfig, new: FleetConfig) -> list[str]:
    refused = []
    for key in ("host", "port"):
        before, after = getattr(old.gateway, key), getattr(new.gateway, key)
        if before != after:
            refused.append(
                f"gateway.{key} changed from {before} to {after}: the gateway's listening "
                "address changes only with a restart of `fleet up` (stop it and start it "
                f"again); put gateway.{key} back to {before} to reload the rest"
            )
    was, now = old.gateway.tls is not None, new.gateway.tls is not None
    if was != now:
        refused.append(
            f"gateway.tls {'removed' if was else 'added'}: the gateway serves "
            f"{'https' if was else 'http'} until a restart of `fleet up` (its listening "
            f"socket keeps its protocol); {'put it back' if was else 'take it out'} to reload "
            "the rest"
        )
    return refused


def _dep_keys(old: Deployment | None, new: Deployment | None) -> list[str]:
    if old is None or new is None:
        return []
    a, b = old.model_dump(), new.model_dump()
    return [k for k in b if a.get(k) != b.get(k)]


def _changed(
    old_config: FleetConfig, new_config: FleetConfig, dep_id: str, old: Spec, new: Spec
) -> str:
    """Which keys of the file made this engine's spec change, in words."""
    keys = _dep_keys(old_config.deployments.get(dep_id), new_config.deployments.get(dep_id))
    keys = [k for k in keys if k != "replicas"]
    if isinstance(old, EngineSpec) and isinstance(new, EngineSpec):
        dep = new_config.deployments[dep_id]
        if dep.command is None and old_config.engine_command != new_config.engine_command:
            keys.append("engine_command")
        for key in _changed_fields(old_config.engines, new_config.engines):
            if key in ("log_dir", "start_timeout", "stall_timeout", "drain_timeout",
                       "vllm_port_base", "vllm_port_span", "base_port",
                       "socket_dir"):  # fmt: skip
                keys.append(f"engines.{key}")
        if old_config.gateway.accept_any_model != new_config.gateway.accept_any_model:
            keys.append("gateway.accept_any_model")
        lora = why_new_engine(new_config, dep_id, old.argv, new.argv)
        if not keys and lora:
            return lora
        if not keys:
            fields = [f for f in ("argv", "env", "port", "uds", "gpus", "vllm_ports") if
                      getattr(old, f) != getattr(new, f)]  # fmt: skip
            keys = fields or ["settings"]
    else:  # a remote endpoint's URL, or local became remote or back
        keys = keys or ["endpoints"]
    return ", ".join(keys) + " changed"


def _changed_fields(old: Any, new: Any) -> list[str]:
    a, b = old.model_dump(), new.model_dump()
    return [k for k in b if a.get(k) != b.get(k)]


def _stop_reason(dep_id: str, replica: int, old: Deployment | None, new: Deployment | None) -> str:
    if new is None:
        return "deployment removed from the file"
    if old is not None and old.remote != new.remote:
        return "now a remote endpoint" if new.remote else "no longer a remote endpoint"
    count = len(new.endpoints) if new.remote else new.replicas
    before = (len(old.endpoints) if old.remote else old.replicas) if old is not None else 0
    return f"replicas {before} -> {count}" if not new.remote else f"endpoints {before} -> {count}"


def _start_reason(dep_id: str, replica: int, old: Deployment | None, new: Deployment) -> str:
    if old is None:
        return "new deployment"
    if old.remote != new.remote:
        return "now a remote endpoint" if new.remote else "no longer a remote endpoint"
    before = len(old.endpoints) if old.remote else old.replicas
    count = len(new.endpoints) if new.remote else new.replicas
    label = "endpoints" if new.remote else "replicas"
    return f"{label} {before} -> {count}"


def _keys_change(old: list[KeyConfig], new: list[KeyConfig]) -> str:
    """Which named keys were added, removed or changed (by name, never the secret)."""
    before, after = {k.name: k for k in old}, {k.name: k for k in new}
    parts = []
    for label, names in (
        ("added", [n for n in after if n not in before]),
        ("removed", [n for n in before if n not in after]),
        ("changed", [n for n in after if n in before and after[n] != before[n]]),
    ):
        if names:
            parts.append(f"{label} {', '.join(names)}")
    return "keys: " + ("; ".join(parts) or "reordered")


def _gateway_changes(old: FleetConfig, new: FleetConfig) -> list[str]:
    """Changes the gateway applies in place: its own keys, and names that route."""
    out = []
    for key in _changed_fields(old.gateway, new.gateway):
        if key == "api_keys":
            out.append("api_keys changed")  # never the keys themselves
        elif key == "keys":
            out.append(_keys_change(old.gateway.keys, new.gateway.keys))
        elif key == "tls" and new.gateway.tls is not None:
            tls = new.gateway.tls
            out.append(f"tls: certificate {tls.cert}, key {tls.key} for new connections")
        elif key != "accept_any_model":
            before, after = getattr(old.gateway, key), getattr(new.gateway, key)
            out.append(f"{key}: {before} -> {after}")
    for a_id, adapter in new.adapters.items():
        before_adapter = old.adapters.get(a_id)
        if before_adapter is not None and before_adapter.aliases != adapter.aliases:
            before, after = (
                ", ".join(before_adapter.aliases) or "-",
                ", ".join(adapter.aliases) or "-",
            )
            out.append(f"{a_id}: aliases {before} -> {after}")
    for dep_id, dep in new.deployments.items():
        was = old.deployments.get(dep_id)
        if was is not None and was.aliases != dep.aliases:
            before, after = ", ".join(was.aliases) or "-", ", ".join(dep.aliases) or "-"
            out.append(f"{dep_id}: aliases {before} -> {after}")
        if was is not None and was.routing != dep.routing:
            out.append(f"{dep_id}: routing {was.routing} -> {dep.routing}")
        if was is not None and was.served_as != dep.served_as:
            out.append(f"{dep_id}: `model` is rewritten to {dep.served_as}")
    return out


# engines.* keys that change no engine's spec: the running engines take them in place.
IN_PLACE_SETTINGS = (
    "health_interval", "max_restarts", "backoff_initial", "backoff_max", "stable_after",
    "log_max_mb", "log_keep", "stop_timeout", "drain_timeout",
)  # fmt: skip


def _settings_changes(old: FleetConfig, new: FleetConfig) -> list[str]:
    return [
        f"{key}: {getattr(old.engines, key)} -> {getattr(new.engines, key)}"
        for key in _changed_fields(old.engines, new.engines)
        if key in IN_PLACE_SETTINGS
    ]
