"""On-demand deployments at run time: a request for an engine that is not loaded waits
in its deployment's bounded queue while the fleet makes room in the swap group and
loads or wakes it; a loaded one idle for its `idle_timeout` is unloaded.

One task per group (an on-demand deployment that shares no GPU is a group of one) asks
`swaps.next_step` what to do and does it, one step at a time, so a group has one swap at
a time. A step holds the locks of the deployments it moves, so a reload that regroups
them never runs two steps on one deployment at once. Moving engines on and off the GPUs
is `engines/swapping.py`'s (through the supervisor, which owns the processes); the
waiters, the per-deployment records and the metrics are `engines/waiting.py`'s.

The queue: `enqueue` (the gateway's exchange, when no replica may take a request) gives
a `Waiter`, or the 503 to answer at once (the queue is full, or the last load failed
moments ago), or None when the deployment is not waited for (loaded, or not on-demand:
the usual answer applies). A waiter is resumed with None once a replica is ready (the
exchange picks one as usual), or with the 503 to answer when it waited its
`queue_timeout`, the load failed, or the fleet stops. Nothing goes to the client before
that, so a streaming client waits the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from vllm_fleet.config import FleetConfig
from vllm_fleet.engines.supervisor import Supervisor
from vllm_fleet.engines.swapping import Mover
from vllm_fleet.engines.waiting import DemandMetrics, Record, Resume, Waiter, refusal
from vllm_fleet.gateway.errors import Reply, not_on_demand
from vllm_fleet.registry import Registry, State, Upstream
from vllm_fleet.swaps import HOLDING, Load, Member, Phase, Unload, next_step, phase_of

log = logging.getLogger(__name__)

POLL = 1.0  # how often a group looks at its members when nothing wakes it (idle clocks)
POLL_WAITING = 0.1  # ... while requests wait for an engine that is restarting
RETRY_FAILED_LOAD = 30.0  # a failed load is not tried again before this


@dataclass(eq=False)
class _Group:
    name: str
    members: list[Record]
    gpus: tuple[int, ...]
    shown: bool  # a real swap group (two members or more), not a lone deployment
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    manual: deque[tuple[str, asyncio.Future[str]]] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    retired: bool = False
    swaps: int = 0
    last_swap: dict[str, Any] | None = None


class Demand:
    """The on-demand deployments of a running fleet (the gateway's `OnDemand`)."""

    def __init__(
        self,
        registry: Registry,
        supervisor: Supervisor,
        prometheus: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry
        self.supervisor = supervisor
        self.metrics = DemandMetrics(prometheus)
        self.mover = Mover(registry, supervisor)
        self._deps: dict[str, Record] = {}
        self._groups: dict[str, _Group] = {}
        self._of: dict[str, _Group] = {}  # deployment -> its group
        self._started = False
        self._closed = False
        self._jobs: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrange(registry.config)

    # ------------------------------------------------------------ life

    def start(self) -> None:
        self._started = True
        self._loop = asyncio.get_running_loop()
        for group in self._groups.values():
            self._run_group(group)

    def reconfigure(self, config: FleetConfig) -> None:
        """A reload's file: regroup, keep the queues of deployments still on demand,
        answer those of removed ones, and start the engines of deployments that are no
        longer on demand (`start: always`) but not running."""
        old = dict(self._deps)
        self._arrange(config)
        for dep_id in set(old) - set(self._deps):
            if dep_id not in config.deployments:
                self._answer_all(old[dep_id], "removed", "it was removed from the fleet file")
                continue
            self._answer_all(old[dep_id], None, "")  # always on now: answered as such
            for up in self.registry.upstreams(dep_id):
                if up.state in (State.UNLOADED, State.SLEEPING):
                    self._spawn(self.mover.bring_up_always(up, config.deployments[dep_id].sleep))
        if self._started:
            for group in self._groups.values():
                if group.task is None:
                    self._run_group(group)

    async def stop(self) -> None:
        """The fleet stops: every waiting request gets its 503, the groups end."""
        self._closed = True
        for record in list(self._deps.values()):
            self._answer_all(record, "stopping", "the fleet is stopping")
        tasks: list[asyncio.Future[Any]] = [
            g.task for g in self._groups.values() if g.task is not None
        ]
        tasks += self._jobs
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _arrange(self, config: FleetConfig) -> None:
        """Records and groups for `config`'s on-demand deployments (the plan's swap
        groups; a deployment in none is a group of its own). A group whose members are
        the same keeps its task; the others' tasks end after their current step."""
        planned = {name: g for g in self.registry.plan.groups for name in g.members}
        deps = {
            dep_id: self._deps.get(dep_id) or Record(dep_id)
            for dep_id, dep in config.deployments.items()
            if dep.on_demand
        }
        groups: dict[str, _Group] = {}
        of: dict[str, _Group] = {}
        for dep_id, record in deps.items():
            plan_group = planned.get(dep_id)
            name = plan_group.name if plan_group is not None else dep_id
            group = groups.get(name)
            if group is None:
                gpus = plan_group.gpus if plan_group is not None else ()
                group = groups[name] = _Group(name, [], gpus, plan_group is not None)
            group.members.append(record)
            of[dep_id] = group
        for name, group in list(groups.items()):
            kept = self._groups.get(name)
            if kept is not None and not kept.retired and kept.members == group.members:
                kept.gpus, kept.shown = group.gpus, group.shown
                groups[name] = kept
                for record in kept.members:
                    of[record.id] = kept
        for name, group in self._groups.items():
            if groups.get(name) is not group:
                group.retired = True
                group.kick.set()
                for _, done in group.manual:
                    if not done.done():
                        done.set_result("regrouped by a reload; ask again")
        self._deps, self._groups, self._of = deps, groups, of

    def _run_group(self, group: _Group) -> None:
        group.task = asyncio.create_task(self._group_loop(group), name=f"swap group {group.name}")

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._jobs.add(task)  # kept until done (the loop holds tasks weakly)
        task.add_done_callback(self._jobs.discard)

    # ------------------------------------------------------------ the queue

    def enqueue(self, dep_id: str, resume: Resume) -> Waiter | Reply | None:
        """A request for `dep_id` found no replica to take it (see the module docstring)."""
        record = self._deps.get(dep_id)
        if record is None or self._closed:
            return None
        ups = self.registry.upstreams(dep_id)
        phase = phase_of(ups)
        if phase is Phase.LOADED and not any(u.state is State.STARTING for u in ups):
            return None  # loaded, but no replica may take it: the usual 503
        settings = self.registry.config.deployments[dep_id]
        now = time.monotonic()
        if phase is Phase.FAILED and now < record.retry_at:
            self.metrics.refused.labels(dep_id, "failed").inc()
            return refusal(
                f"deployment `{dep_id}` failed to load moments ago ({self._failure(record, ups)}); "
                "see `fleet status` and its engine log",
                "deployment_failed",
                record.retry_at - now,
            )
        if len(record.queue) >= settings.max_queued:
            self.metrics.refused.labels(dep_id, "full").inc()
            return refusal(
                f"deployment `{dep_id}` is {self._doing(record)}, and {len(record.queue)} "
                f"request(s) already wait for it (max_queued: {settings.max_queued}); retry "
                "shortly, or raise its max_queued",
                "queue_full",
                record.last_load_s or 10.0,
            )
        waiter = Waiter(dep_id, now, resume, record.queue)
        record.queue.append(waiter)
        loop = self._loop or asyncio.get_running_loop()
        waiter.timer = loop.call_later(
            settings.queue_timeout, self._expire, waiter, record, settings.queue_timeout
        )
        self.metrics.queued.labels(dep_id).set(len(record.queue))
        group = self._of.get(dep_id)
        if group is not None:
            group.kick.set()
        return waiter

    def _expire(self, waiter: Waiter, record: Record, seconds: float) -> None:
        """`waiter` waited its queue_timeout (`seconds`): its 503."""
        waiter.timer = None
        waiter.cancel()
        dep_id = waiter.deployment
        self.metrics.refused.labels(dep_id, "timeout").inc()
        self.metrics.queued.labels(dep_id).set(len(record.queue))
        doing = self._doing(record) if dep_id in self._deps else "no longer on demand"
        waiter.resume(
            refusal(
                f"waited {seconds:g}s (queue_timeout) for deployment `{dep_id}`, which is "
                f"{doing}; retry, or raise its queue_timeout",
                "queue_timeout",
                record.last_load_s or 10.0,
            )
        )

    def _resume_ready(self, record: Record) -> None:
        """Requests waiting for a deployment that has a replica to take them: go."""
        if not record.queue:
            return
        ups = self.registry.upstreams(record.id)
        if not any(u.state is State.READY and u.ejected is None for u in ups):
            return
        now = time.monotonic()
        waiting = list(record.queue)
        record.queue.clear()
        self.metrics.queued.labels(record.id).set(0)
        for waiter in waiting:
            waiter.queue = None
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
            self.metrics.queue_wait.labels(record.id).observe(now - waiter.since)
            waiter.resume(None)

    def _answer_all(self, record: Record, reason: str | None, why: str) -> None:
        """Resume every waiter of `record` with a 503 (`reason` for the metric), or with
        None (`reason` None: let them be answered as usual)."""
        dep_id = record.id
        waiting = list(record.queue)
        record.queue.clear()
        self.metrics.queued.labels(dep_id).set(0)
        for waiter in waiting:
            waiter.queue = None
            if waiter.timer is not None:
                waiter.timer.cancel()
                waiter.timer = None
            if reason is None:
                waiter.resume(None)
                continue
            self.metrics.refused.labels(dep_id, reason).inc()
            waiter.resume(
                refusal(
                    f"deployment `{dep_id}` was not loaded: {why}",
                    "deployment_unavailable",
                    RETRY_FAILED_LOAD,
                )
            )

    # ------------------------------------------------------------ words

    def _failure(self, record: Record, ups: list[Upstream]) -> str:
        failed = [f"{u.name}: {u.message}" for u in ups if u.state is State.FAILED and u.message]
        return "; ".join(failed) or record.note or "no engine became ready"

    def _doing(self, record: Record) -> str:
        """What the deployment is doing now, in words, for the 503s."""
        ups = self.registry.upstreams(record.id)
        phase = phase_of(ups)
        now = time.time()
        if phase is Phase.LOADING:
            since = min((u.since for u in ups), default=now)
            return f"loading for {now - since:.0f}s ({ups[0].message if ups else 'starting'})"
        if phase is Phase.UNLOADING:
            return "being unloaded to make room (its requests in flight finish first)"
        group = self._of.get(record.id)
        holders = [
            m.id for m in (group.members if group else []) if phase_of(self._ups(m.id)) in HOLDING
        ]
        holders = [h for h in holders if h != record.id]
        state = phase.value
        if holders:
            return (
                f"{state}, waiting for `{', '.join(holders)}` to free the GPUs of swap group "
                f"`{group.name if group else record.id}`"
            )
        return f"{state}, about to load"

    def _ups(self, dep_id: str) -> list[Upstream]:
        return self.mover.engines(dep_id)

    # ------------------------------------------------------------ the group's steps

    async def _group_loop(self, group: _Group) -> None:
        while not self._closed and not group.retired:
            try:
                timeout = await self._one_step(group)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("swap group %s: a step failed", group.name)
                timeout = POLL
            if timeout is None:
                continue
            group.kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.kick.wait(), timeout)

    async def _one_step(self, group: _Group) -> float | None:
        """Do the group's next step; None when done one (look again at once), else how
        long to wait for something to change."""
        now = time.monotonic()
        members = []
        restarting = False
        for record in group.members:
            ups = self._ups(record.id)
            served = sum(u.served for u in ups)
            in_flight = sum(u.outstanding for u in ups)
            # In use: a POST sent since the last look, or requests still in flight.
            if served != record.served or in_flight > 0:
                record.last_used = now
                record.served = served
            self._resume_ready(record)
            self.metrics.queued.labels(record.id).set(len(record.queue))  # (clients left)
            phase = phase_of(ups)
            restarting = restarting or bool(record.queue and phase is Phase.LOADING)
            if phase is Phase.LOADED and record.loaded_at == 0.0:
                record.loaded_at = now  # loaded before (fleet up of a kept engine, a reload)
            members.append(
                Member(
                    record.id,
                    phase,
                    in_flight,
                    record.queue[0].since if record.queue else None,
                    record.last_used,
                    record.loaded_at,
                    self.registry.config.deployments[record.id].idle_timeout,
                    self.registry.config.deployments[record.id].min_hold,
                    record.retry_at,
                )
            )
        if group.manual:
            dep_id, done = group.manual.popleft()
            found = self._deps.get(dep_id)
            if found is not None:
                async with found.lock:
                    found.note = await self.mover.release(
                        dep_id, "unloaded by hand", "by hand", keep_sleeping=False
                    )
            if not done.done():
                done.set_result(phase_of(self._ups(dep_id)).value)
            return None
        step = next_step(members, now)
        if isinstance(step, Load):
            await self._swap(group, step)
            return None
        if isinstance(step, Unload):
            record = self._deps[step.deployment]
            async with record.lock:
                record.note = (
                    await self.mover.release(record.id, step.why, "idle", keep_sleeping=True)
                    or record.note
                )
            return None
        timeout = POLL_WAITING if restarting else POLL
        if step.until is not None:
            timeout = min(timeout, max(0.0, step.until - now))
        return timeout

    async def _swap(self, group: _Group, step: Load) -> None:
        records = [self._deps[name] for name in (*step.evict, step.deployment)]
        async with contextlib.AsyncExitStack() as stack:
            for record in sorted(records, key=lambda r: r.id):
                await stack.enter_async_context(record.lock)
            began = time.monotonic()
            wanted = self._deps[step.deployment]
            for name in step.evict:
                evicted = self._deps[name]
                evicted.note = (
                    await self.mover.release(
                        name, f"making room for `{step.deployment}`", "swap", keep_sleeping=True
                    )
                    or evicted.note
                )
            room = time.monotonic()
            kind, ready = await self.mover.bring_up(step.deployment)
            problem = None if ready else self._failure(wanted, self._ups(step.deployment))
            took = time.monotonic() - began
        now = time.monotonic()
        timing = {
            "seconds": round(took, 3),
            "unload_s": round(room - began, 3),
            "load_s": round(now - room, 3),
        }
        if problem is None:
            wanted.loaded_at = wanted.last_used = now
            wanted.last_load_s = took
            wanted.note = ""
            group.swaps += 1
            self.metrics.swaps.labels(group.name, kind).inc()
            self.metrics.swap_seconds.labels(group.name).observe(took)
            group.last_swap = {
                "to": step.deployment,
                "from": list(step.evict),
                "kind": kind,
                **timing,
                "at": round(time.time(), 3),
            }
            log.info(
                "swap group %s: %s loaded (%s) in %.2fs%s", group.name, step.deployment, kind,
                took, f", after unloading {', '.join(step.evict)}" if step.evict else "",
            )  # fmt: skip
            self._resume_ready(wanted)
            return
        wanted.retry_at = now + RETRY_FAILED_LOAD
        wanted.note = problem
        log.error("swap group %s: %s did not load: %s", group.name, step.deployment, problem)
        group.last_swap = {
            "to": step.deployment, "from": list(step.evict), "kind": kind, **timing,
            "at": round(time.time(), 3), "failed": problem,
        }  # fmt: skip
        self._answer_all(wanted, "failed", f"its load failed ({problem})")

    # ------------------------------------------------------------ by hand

    async def load(self, dep_id: str) -> tuple[int, dict[str, Any]]:
        """`POST /fleet/deployments/{id}/load`: queue for it like a request, and answer
        once it is loaded (or could not be)."""
        if dep_id not in self._deps:
            return 409, _body(not_on_demand(dep_id))
        began = time.monotonic()
        answered: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()

        def resume(reply: Reply | None) -> None:
            if not answered.done():
                answered.set_result(reply)

        queued = self.enqueue(dep_id, resume)
        if isinstance(queued, Reply):
            return queued.status, _body(queued)
        if isinstance(queued, Waiter):
            try:
                reply = await answered
            finally:
                queued.cancel()
            if reply is not None:
                return reply.status, _body(reply)
        took = time.monotonic() - began
        return 200, {"deployment": dep_id, "state": self.phase(dep_id), "took_s": round(took, 3)}

    async def unload(self, dep_id: str) -> tuple[int, dict[str, Any]]:
        """`POST /fleet/deployments/{id}/unload`: drain it and stop its engines."""
        group = self._of.get(dep_id)
        if group is None:
            return 409, _body(not_on_demand(dep_id))
        began = time.monotonic()
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        group.manual.append((dep_id, done))
        group.kick.set()
        state = await done
        took = time.monotonic() - began
        return 200, {"deployment": dep_id, "state": state, "took_s": round(took, 3)}

    # ------------------------------------------------------------ status

    def phase(self, dep_id: str) -> str:
        return phase_of(self.registry.upstreams(dep_id)).value

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        deployments = {}
        for dep_id, record in self._deps.items():
            settings = self.registry.config.deployments[dep_id]
            group = self._of.get(dep_id)
            deployments[dep_id] = {
                "state": self.phase(dep_id),
                "group": group.name if group is not None and group.shown else None,
                "queued": len(record.queue),
                "oldest_wait_s": round(now - record.queue[0].since, 3) if record.queue else None,
                "idle_s": round(now - record.last_used, 1),
                "idle_timeout": settings.idle_timeout,
                "sleep": settings.sleep,
                "last_load_s": round(record.last_load_s, 3) if record.last_load_s else None,
                "note": record.note,
            }
        groups = {}
        for group in self._groups.values():
            if not group.shown:
                continue
            holders = [m.id for m in group.members if phase_of(self._ups(m.id)) in HOLDING]
            groups[group.name] = {
                "members": [m.id for m in group.members],
                "gpus": list(group.gpus),
                "holder": holders[0] if holders else None,
                "queued": sum(len(m.queue) for m in group.members),
                "swaps": group.swaps,
                "last_swap": group.last_swap,
            }
        return {"deployments": deployments, "groups": groups}


def _body(reply: Reply) -> dict[str, Any]:
    data = json.loads(reply.body)
    return data if isinstance(data, dict) else {"error": data}
