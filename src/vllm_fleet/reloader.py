"""Reloading the fleet file while the fleet serves: `fleet reload`, SIGHUP to `fleet up`
and `POST /fleet/reload` all end here, with one behaviour.

1. Read the file again (the one `fleet up` was started with, or the one given, which is
   the fleet's file from then on) and validate it whole, its TLS certificate and key too:
   a bad file changes nothing and its problems are answered with their lines, like
   `fleet check`.
2. Plan it against what runs (`build_plan(..., prior=)`), and diff (`reconcile`): the
   plan is answered, printed and logged; a dry run stops here.
3. Apply: in one step of the event loop the gateway takes the new file and routing
   changes (`Rollout.begin`); then engines start, drain and stop, and replicas are
   replaced one by one in the background (`Rollout.run`). `fleet status` shows the
   progress and the result (`fleet.reload`); one reload runs at a time.

`--host`/`--port` given to `fleet up` stay in force for every reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vllm_fleet.config import ConfigError, FleetConfig, load
from vllm_fleet.engines import Supervisor
from vllm_fleet.engines.demand import Demand
from vllm_fleet.engines.rollout import Rollout
from vllm_fleet.gateway.errors import error_object
from vllm_fleet.gateway.relay import RelayServer
from vllm_fleet.gateway.tls import ServerTls, server_tls
from vllm_fleet.gpus import read_inventory
from vllm_fleet.plan import EngineSpec, Plan, build_plan
from vllm_fleet.reconcile import Changes, reconcile
from vllm_fleet.registry import Registry, State, Upstream

log = logging.getLogger(__name__)


def file_hash(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256 (empty when it cannot be read)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def absolute(file: str) -> Path:
    """A path from a request, made absolute against `fleet up`'s own directory."""
    return Path(os.path.abspath(os.path.expanduser(file)))


def with_overrides(config: FleetConfig, overrides: dict[str, Any]) -> FleetConfig:
    """`fleet up --host/--port` over the file's gateway section."""
    if not overrides:
        return config
    gateway = config.gateway.model_copy(update=overrides)
    return config.model_copy(update={"gateway": gateway})


def rewrite_targets(registry: Registry) -> dict[str, str]:
    """Per deployment, the `model` the gateway rewrites to: the name its engines answer
    with (their first --served-model-name), routed and on standby together; while they
    differ (a replace that changes `model` or `served_name`, mid-way), the deployment's
    id, which every engine of it accepts, so no request is refused during the change."""
    targets: dict[str, str] = {}
    standby: dict[str, list[Upstream]] = {}
    for up in registry.standby:
        standby.setdefault(up.deployment, []).append(up)
    for dep_id, ups in registry.by_deployment.items():
        names = {
            u.spec.served_names[0]
            for u in [*ups, *standby.get(dep_id, [])]
            if isinstance(u.spec, EngineSpec) and u.spec.served_names
        }
        if len(names) == 1:
            targets[dep_id] = names.pop()
        elif names:
            targets[dep_id] = dep_id
    return targets


class Reloader:
    """The running fleet's reloads (the gateway's `Control`)."""

    def __init__(
        self,
        file: Path,
        config: FleetConfig,
        registry: Registry,
        supervisor: Supervisor,
        console: Console,
        overrides: dict[str, Any] | None = None,
        hurry: asyncio.Event | None = None,
    ) -> None:
        self.file = file
        self.config = config
        self.registry = registry
        self.supervisor = supervisor
        self.console = console
        self.overrides = overrides or {}
        self.hurry = hurry
        self.server: RelayServer | None = None
        self.demand: Demand | None = None  # the on-demand deployments (`fleet up` sets it)
        self.tls: ServerTls | None = None  # what the gateway serves with (`fleet up` sets it)
        self._applying: asyncio.Task[None] | None = None
        registry.fleet = {
            "file": str(file),
            "generation": 1,
            "hash": file_hash(file),
            "loaded_at": round(time.time(), 3),
            "reload": None,
        }

    @property
    def busy(self) -> bool:
        return self._applying is not None and not self._applying.done()

    def cancel(self) -> None:
        """The fleet stops: a reload still applying ends here."""
        if self._applying is not None:
            self._applying.cancel()

    def _prepare(
        self, path: Path, prior: Plan, failed: frozenset[str]
    ) -> tuple[FleetConfig, Plan, Changes, str, ServerTls | None]:
        """Load, plan and diff (in a thread: it reads the file, the TLS files, and asks
        nvidia-smi). A certificate or key that changed on disk under the same names is
        a change of its own: new connections get it."""
        digest = file_hash(path)
        config = with_overrides(load(path), self.overrides)
        tls = server_tls(config)
        plan = build_plan(config, read_inventory(), sys.executable, prior=prior)
        changes = reconcile(self.config, prior, config, plan, failed)
        now = self.tls
        if (
            tls is not None
            and now is not None
            and (tls.cert, tls.key) == (now.cert, now.key)
            and tls.digest != now.digest
        ):
            line = f"tls: {tls.cert} or {tls.key} changed on disk, read again for new connections"
            changes = replace(changes, gateway=(*changes.gateway, line))
        return config, plan, changes, digest, tls

    def _record(self, result: str, **fields: Any) -> dict[str, Any]:
        self.registry.reloads[result] = self.registry.reloads.get(result, 0) + 1
        record = {"result": result, "at": round(time.time(), 3), **fields}
        self.registry.fleet["reload"] = record
        return record

    async def reload(
        self, file: str | None, dry_run: bool, via: str = "POST /fleet/reload"
    ) -> tuple[int, dict[str, Any]]:
        """Plan (and unless `dry_run`, apply) the fleet file; the HTTP status and JSON
        answer. The change itself goes on after this returns (202)."""
        if self.busy:
            running = self.registry.fleet.get("reload") or {}
            return 409, {
                **error_object(
                    409,
                    f"a reload is being applied (generation {running.get('generation')}); "
                    "wait for it to finish (`fleet status`) and reload again",
                    "reload_in_progress",
                ),
                "reload": running,
            }
        path = absolute(file) if file else self.file
        try:
            failed = frozenset(u.name for u in self.registry.all() if u.state is State.FAILED)
            config, plan, changes, digest, tls = await asyncio.to_thread(
                self._prepare, path, self.registry.running_plan(), failed
            )
        except ConfigError as exc:
            problems = [
                {"line": i.line, "where": i.where(), "message": i.message} for i in exc.issues
            ]
            text = exc.render()
            if not dry_run:
                self._record("invalid", file=str(path), message=text, via=via)
                self._say(f"[bold red]reload ({via}) refused[/], the fleet runs as it was: ", text)
            return 422, {
                **error_object(422, text, "invalid_fleet_file"),
                "result": "invalid",
                "problems": problems,
            }
        answer: dict[str, Any] = {"file": str(path), "plan": changes.as_json()}
        if changes.refused:
            text = "; ".join(changes.refused)
            if not dry_run:
                self._record("refused", file=str(path), message=text, via=via)
                self._say(f"[bold red]reload ({via}) refused[/], the fleet runs as it was: ", text)
            return 409, {
                **error_object(409, text, "restart_required"),
                **answer,
                "result": "refused",
            }
        if dry_run:
            return 200, {**answer, "result": "planned"}
        fleet = self.registry.fleet
        if changes.empty and digest == fleet.get("hash") and path == self.file:
            record = self._record("unchanged", file=str(path), via=via)
            self._say(f"reload ({via}): ", "nothing to change")
            return 200, {**answer, "result": "unchanged", "reload": record}
        generation = int(fleet.get("generation", 1)) + 1
        self._apply(path, config, plan, changes, digest, generation, via, tls)
        return 202, {**answer, "result": "applying", "reload": fleet["reload"]}

    def _apply(
        self,
        path: Path,
        config: FleetConfig,
        plan: Plan,
        changes: Changes,
        digest: str,
        generation: int,
        via: str,
        tls: ServerTls | None = None,
    ) -> None:
        """Switch routing and the gateway now; start the rest (see the module docstring)."""
        on_demand = frozenset(i for i, d in config.deployments.items() if d.on_demand)
        rollout = Rollout(
            changes, self.registry, self.supervisor, config.engines.drain_timeout, self.hurry,
            on_demand=on_demand,
        )  # fmt: skip
        rollout.begin()
        self.registry.reconfigure(config, plan)
        if self.demand is not None:
            self.demand.reconfigure(config)
        self._reconfigure_gateway(config)
        if tls is not None and self.server is not None and self.server.tls:
            self.server.use_tls(tls.context)
            self.tls = tls
        self.supervisor.apply_settings(config)
        self.config, self.file = config, path
        started = time.time()
        self.registry.fleet.update(
            {"file": str(path), "generation": generation, "hash": digest, "loaded_at": started}
        )
        record = {
            "generation": generation,
            "state": "applying",
            "file": str(path),
            "via": via,
            "started": round(started, 3),
            "plan": changes.lines(),
        }
        self.registry.fleet["reload"] = {"result": "applying", **record}
        self.console.print(
            f"reload ({escape(via)}): generation {generation} of {escape(str(path))}",
            highlight=False,
        )
        for line in changes.lines():
            self.console.print(f"  {escape(line)}", highlight=False)
        log.info("reload generation %d: %s", generation, "; ".join(changes.lines()))
        self._applying = asyncio.create_task(self._finish(rollout, record), name="reload")

    def _reconfigure_gateway(self, config: FleetConfig) -> None:
        if self.server is None:
            return
        self.server.reconfigure(config)
        self.server.core.names.served.update(rewrite_targets(self.registry))

    async def _finish(self, rollout: Rollout, record: dict[str, Any]) -> None:
        interrupted = False
        try:
            await rollout.run()
        except asyncio.CancelledError:
            interrupted = True  # the fleet is stopping
            raise
        finally:
            self._reconfigure_gateway(self.config)  # the names the engines now answer to
            took = time.time() - record["started"]
            result = "failed" if rollout.failures else "applied"
            result = "interrupted" if interrupted else result
            self._record(
                result,
                **{k: v for k, v in record.items() if k != "state"},
                state="done",
                took_s=round(took, 1),
                done=rollout.done,
                failures=rollout.failures,
            )
            generation = record["generation"]
            if interrupted:
                self.console.print(
                    f"[bold yellow]reload generation {generation} interrupted[/] after "
                    f"{took:.0f}s: the fleet is stopping",
                    highlight=False,
                )
            elif rollout.failures:
                self.console.print(
                    f"[bold yellow]reload generation {generation} applied with failures[/] "
                    f"in {took:.0f}s (the rest is applied):",
                    highlight=False,
                )
                for failure in rollout.failures:
                    self.console.print(f"  ✗ {escape(failure)}", highlight=False)
            else:
                self.console.print(
                    f"[bold green]reload generation {generation} applied[/] in {took:.0f}s",
                    highlight=False,
                )

    def _say(self, head: str, text: str) -> None:
        self.console.print(head + escape(text), highlight=False)
