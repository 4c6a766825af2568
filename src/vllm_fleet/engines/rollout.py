"""Applying a reload's `Changes` (reconcile.py) to the running fleet.

`begin()` runs in one step of the event loop, together with the gateway taking the new
file (reloader.py), so no request sees half of it: new engines and replicas join
routing (503 with Retry-After while they load), removed ones leave it (in flight
requests go on), updates take their new spec. `run()` then does the slow part:

- stop: drain (`engines.drain_timeout`: until its requests in flight are done), then
  the usual stop sequence; concurrently for every engine that stops.
- start: at once, or once the engines named in its `after` have stopped.
- replace, one replica after another within a deployment:
  beside: the new engine starts on standby (not routed to); once ready it takes the old
  one's place, and the old one is drained and stopped. If it never gets ready, the old
  one keeps serving and the failure is reported.
  stop-first: the old one leaves routing and is drained and stopped, then the new one
  starts (it needs the old one's GPUs or port).
- restart: an engine that had failed, kept by the new file, is started again (with the
  new file's settings for it).

LoRA adapters (`changes.adapters`): every ready engine of a base whose adapters changed,
and that the reload does not replace or stop, loads and unloads them in place
(`Supervisor.sync_adapters`); an engine that is not ready gets them when it starts.

On-demand deployments (`start: on_demand`, engines/demand.py) are loaded only when asked
for: a new engine of one joins routing unloaded; a replaced one is stopped first and its
replacement waits, unloaded, for the next request; one that had failed is unloaded.

Every failure is said in the result, by engine; nothing else is rolled back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from vllm_fleet.engines.supervisor import Supervisor
from vllm_fleet.reconcile import Action, AdapterAction, Changes, Step
from vllm_fleet.registry import Registry, State, Upstream, upstream_for

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    changes: Changes
    registry: Registry
    supervisor: Supervisor
    drain: float
    cut_short: asyncio.Event | None = None
    on_demand: frozenset[str] = frozenset()  # deployments loaded only when asked for
    failures: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    _stopped: dict[str, asyncio.Event] = field(default_factory=dict)  # engine name -> gone
    _current: dict[str, Upstream] = field(default_factory=dict)  # name -> routed upstream
    _new: dict[str, Upstream] = field(default_factory=dict)  # name -> upstream it starts

    def begin(self) -> None:
        """The routing part, all at once (see the module docstring)."""
        registry = self.registry
        self._current = {u.name: u for u in registry.all()}
        for step in self.changes.steps:
            old = self._current.get(step.name)
            if step.action in (Action.STOP, Action.REPLACE):
                self._stopped[step.name] = asyncio.Event()
            if step.action is Action.STOP and old is not None:
                registry.remove(old)
            elif step.action is Action.START and step.new is not None:
                up = upstream_for(step.new)
                if up.managed and step.deployment in self.on_demand:
                    up.set_state(State.UNLOADED, "unloaded (start: on_demand)")
                elif step.after:
                    up.set_state(State.STARTING, f"waiting for {', '.join(step.after)} to stop")
                self._new[step.name] = up
                registry.add(up)
            elif (
                step.action in (Action.UPDATE, Action.RESTART)
                and old is not None
                and step.new is not None
            ):
                old.spec = step.new
                for engine in self.supervisor.engines:
                    if engine.upstream is old and isinstance(step.new, type(engine.spec)):
                        engine.spec = step.new
            elif step.action is Action.REPLACE and step.new is not None:
                up = upstream_for(step.new)
                self._new[step.name] = up
                if not step.managed:  # a remote endpoint: nothing to start or drain first
                    if old is not None:
                        registry.swap(old, up)
                    else:
                        registry.add(up)
                elif step.deployment in self.on_demand:
                    up.set_state(State.UNLOADED, "unloaded (start: on_demand)")
                elif step.beside:
                    up.set_state(State.STARTING, f"replacing {step.name}, on standby")
                    registry.standby.append(up)

    async def run(self) -> None:
        """The slow part: drains, stops, starts and replaces (see the module docstring)."""
        by_dep: dict[str, list[Step]] = {}
        jobs: list[asyncio.Task[None]] = []
        for step in self.changes.steps:
            if step.action is Action.STOP:
                jobs.append(asyncio.create_task(self._stop(step)))
            elif step.action is Action.START:
                jobs.append(asyncio.create_task(self._start(step)))
            elif step.action is Action.REPLACE:
                by_dep.setdefault(step.deployment, []).append(step)
            elif step.action is Action.RESTART:
                old = self._current.get(step.name)
                if old is not None:
                    jobs.append(asyncio.create_task(self._restart(old)))
        for steps in by_dep.values():
            jobs.append(asyncio.create_task(self._replace_in_turn(steps)))
        synced: dict[str, bool] = {}  # kept engine -> its adapters were synced
        if self.changes.adapters:
            jobs.append(asyncio.create_task(self._adapters(synced)))
        try:
            await asyncio.gather(*jobs)
            if self.changes.adapters:
                self._adapters_said(synced)
        finally:
            for job in jobs:
                job.cancel()

    async def _adapters(self, synced: dict[str, bool]) -> None:
        """Load and unload the adapters that changed on the engines that keep running."""
        moving = {
            s.name for s in self.changes.steps if s.action not in (Action.KEEP, Action.UPDATE)
        }
        bases = dict.fromkeys(a.base for a in self.changes.adapters)
        engines = [
            up
            for base in bases
            for up in self.registry.upstreams(base)
            if up.managed and up.name not in moving
        ]
        results = await asyncio.gather(
            *(self.supervisor.sync_adapters(up, self.drain) for up in engines)
        )
        for up, problems in zip(engines, results, strict=True):
            synced[up.name] = problems is not None
            self.failures.extend(problems or ())

    def _adapters_said(self, synced: dict[str, bool]) -> None:
        """Each changed adapter's outcome, once every engine of its base has started: where
        it is loaded, and where its load failed on an engine this reload started (a kept
        engine's failure is said by `_adapters`)."""
        for step in self.changes.adapters:
            ups = [u for u in self.registry.upstreams(step.base) if u.managed]
            if step.action is AdapterAction.REMOVE:
                where = ", ".join(u.name for u in ups if synced.get(u.name)) or "no running engine"
                self.done.append(f"{step.adapter}: unloaded from {where} ({step.why})")
                continue
            held = [u.name for u in ups if step.adapter in u.adapters]
            for up in ups:
                problem = up.adapter_errors.get(step.adapter)
                if problem is not None and up.name not in synced:
                    self.failures.append(f"{step.adapter} on {up.name}: {problem}")
            failed = any(step.adapter in u.adapter_errors for u in ups)
            if held:
                self.done.append(f"{step.adapter}: loaded on {', '.join(held)} ({step.why})")
            elif not failed and not any(synced.get(u.name) for u in ups):
                self.done.append(
                    f"{step.adapter}: loaded when an engine of `{step.base}` starts ({step.why})"
                )

    async def _retire(self, name: str, upstream: Upstream) -> None:
        try:
            await self.supervisor.retire(upstream, self.drain, self.cut_short)
        finally:
            self.registry.retired(upstream)
            gone = self._stopped.get(name)
            if gone is not None:
                gone.set()

    async def _stop(self, step: Step) -> None:
        old = self._current.get(step.name)
        if old is not None:
            await self._retire(step.name, old)
        self.done.append(f"{step.name}: stopped ({step.why})")

    async def _wait_for(self, names: tuple[str, ...]) -> None:
        for name in names:
            gone = self._stopped.get(name)
            if gone is not None:
                await gone.wait()

    async def _start(self, step: Step) -> None:
        up = self._new[step.name]
        if up.managed and step.deployment in self.on_demand:
            self.done.append(f"{step.name}: added, loaded when asked for ({step.why})")
            return
        await self._wait_for(step.after)
        self.supervisor.ensure(up, "reload")
        if not up.managed:
            self.done.append(f"{step.name}: added ({step.why})")
            return
        if await self.supervisor.until_ready(up):
            self.done.append(f"{step.name}: started and ready ({step.why})")
        else:
            self.failures.append(f"{step.name}: did not start: {up.message or up.state.value}")

    async def _restart(self, up: Upstream) -> None:
        if up.deployment in self.on_demand:
            up.set_state(State.UNLOADED, "unloaded (start: on_demand); it had failed")
            self.done.append(f"{up.name}: had failed; unloaded, loaded when asked for")
            return
        self.supervisor.ensure(up, "reload")
        if await self.supervisor.until_ready(up):
            self.done.append(f"{up.name}: had failed; started again and ready")
        else:
            self.failures.append(f"{up.name}: had failed and failed again: {up.message}")

    async def _replace_in_turn(self, steps: list[Step]) -> None:
        for step in steps:  # one replica after another
            await self._replace(step)

    async def _replace(self, step: Step) -> None:
        old, new = self._current.get(step.name), self._new[step.name]
        gone = self._stopped[step.name]
        if not step.managed:  # routed to the new endpoint since begin(); probe it
            self.supervisor.ensure(new, "reload")
            if old is not None:
                await self._retire(step.name, old)
            gone.set()
            self.done.append(f"{step.name}: endpoint replaced ({step.why})")
            return
        await self._wait_for(step.after)
        if step.deployment in self.on_demand:
            # Stopped first (a swap group's GPUs hold one member at a time); the new
            # engine is loaded by the next request for it.
            if old is not None:
                self.registry.swap(old, new)
                await self._retire(step.name, old)
            else:
                self.registry.add(new)
            gone.set()
            self.done.append(f"{step.name}: replaced; loaded when asked for ({step.why})")
            return
        if step.beside:
            self.supervisor.ensure(new, "reload")
            if not await self.supervisor.until_ready(new):
                why = new.message or new.state.value
                await self.supervisor.retire(new, 0.0)
                self.registry.retired(new)
                gone.set()
                kept = "the old engine keeps serving" if old is not None else "nothing serves"
                self.failures.append(f"{step.name}: its replacement did not start ({why}); {kept}")
                return
            if old is not None:
                self.registry.swap(old, new)
                await self._retire(step.name, old)
            else:
                self.registry.retired(new)
                self.registry.add(new)
            gone.set()
            self.done.append(f"{step.name}: replaced beside the old engine ({step.why})")
            return
        # Stop first: the new engine needs what the old one holds.
        new.set_state(State.STARTING, f"waiting for the old {step.name} to stop")
        if old is not None:
            self.registry.swap(old, new)  # routed: 503 "loading" until it is ready
            await self._retire(step.name, old)
        else:
            self.registry.add(new)
        gone.set()
        self.supervisor.ensure(new, "reload")
        if await self.supervisor.until_ready(new):
            self.done.append(f"{step.name}: replaced, the old engine stopped first ({step.why})")
        else:
            why = new.message or new.state.value
            self.failures.append(f"{step.name}: the new engine did not start ({why})")
