"""All engines of a fleet: one task per engine starts it, restarts it, and stops it.

Restart policy: any exit is a failure (vLLM can exit 0 when its engine core dies), and
so are a start that passes its `start_timeout`, a ready engine whose /health fails
several times in a row, and a ready engine found stalled (busy without token progress
for its `stall_timeout`; it is marked `stalled`, so out of the rotation, while it is
stopped, and counted in `Upstream.stalls`). After a failure the engine is restarted
after a backoff that starts at `engines.backoff_initial` seconds and doubles up to
`engines.backoff_max`.
When an engine has failed more than `engines.max_restarts` times in a row it is marked
failed and the tail of its log is reported. An engine that stayed ready for
`engines.stable_after` seconds has its count of failures in a row reset.

Everyone else (gateway, runner, `fleet status`) reads the states from the registry or
listens to the `EngineEvent`s passed to `on_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from vllm_fleet.config import EnginesConfig, FleetConfig
from vllm_fleet.engines import sleep_mode, sockets
from vllm_fleet.engines.adapters import Adapters
from vllm_fleet.engines.process import LOG_MARK, EngineProcess, Outcome, SpawnError, killpg
from vllm_fleet.engines.remote import watch_remote
from vllm_fleet.plan import EngineSpec
from vllm_fleet.registry import Registry, State, Upstream

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class EngineEvent:
    """A change in one engine's life, for progress displays."""

    upstream: Upstream
    state: State
    message: str
    # On a final failure: the last lines of the engine's log (its last attempt).
    log_tail: tuple[str, ...] = field(default=())


EventCallback = Callable[[EngineEvent], None]


def port_problem(host: str, port: int) -> str | None:
    """None when `port` can be bound on `host` now, else the OS's reason.

    Bound with SO_REUSEADDR like the engines' servers do, so a port only held by
    connections in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot resolve host {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def listen_problem(spec: EngineSpec, settings: EnginesConfig) -> str | None:
    """None when the engine can listen where its spec says, else why not (in words, with
    what to do). A Unix socket's directory is made private first and a stale socket file
    from an earlier run removed."""
    if spec.uds is not None:
        problem = sockets.prepare_dir(spec.uds.parent, settings.socket_group)
        if problem is not None:
            return problem
        busy = sockets.socket_problem(spec.uds)
        if busy is None:
            return None
        return (
            f"socket {spec.uds} is not free ({busy}); another process (an engine from an "
            "earlier run?) holds it. Stop it, or set engines.socket_dir to another directory"
        )
    assert spec.port is not None
    busy = port_problem(spec.host, spec.port)
    if busy is None:
        return None
    return (
        f"port {spec.port} on {spec.host} is not free ({busy}); another process "
        f"(an engine from an earlier run?) holds it. Stop it, or set `port:` on "
        f"deployment `{spec.deployment}` in the fleet file to a free port"
    )


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of an engine log, from its last start only."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    marks = [i for i, line in enumerate(text) if line.startswith(LOG_MARK)]
    if marks:
        text = text[marks[-1] + 1 :]
    text = [line for line in text if not line.startswith(LOG_MARK)]
    return text[-lines:]


def _describe(outcome: Outcome, engine: EngineProcess) -> str:
    if outcome is Outcome.EXITED:
        return f"exited with status {engine.returncode}"
    if outcome is Outcome.TIMEOUT:
        return f"not ready after its start_timeout of {engine.spec.start_timeout:g}s"
    if outcome in (Outcome.UNHEALTHY, Outcome.STALLED):
        return str(engine.upstream.message or outcome.value)
    return str(outcome.value)


@dataclass(eq=False)
class _Owner:
    """The one task that owns an upstream: an engine's life, or a remote's probes."""

    upstream: Upstream
    stop: asyncio.Event  # set: stop this one (retire, or the whole fleet stopping)
    engine: EngineProcess | None  # None for a remote endpoint
    reason: str  # why it was started: "fleet up", "reload", "on demand"
    # An on-demand load: a start that fails before the engine was ever ready is not
    # retried (the request that asked is answered; the next one tries again).
    load_once: bool = False
    task: asyncio.Task[None] | None = None
    stop_reason: str = "shutdown"


class Supervisor:
    """Starts, restarts and stops every engine; one owner task per upstream.

    `start()` takes every upstream in the registry; on a reload, `ensure()` adds one and
    `retire()` drains and stops one (engines/rollout.py decides which, and when)."""

    def __init__(self, registry: Registry, on_event: EventCallback | None = None) -> None:
        self.registry = registry
        self.config: FleetConfig = registry.config
        self.on_event = on_event
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None  # remote endpoints'
        self._owners: dict[Upstream, _Owner] = {}
        self._stopped = False
        self._restarts: set[asyncio.Task[None]] = set()  # restarts an admin asked for
        self.adapters = Adapters(lambda: self.registry.config)

    @property
    def engines(self) -> list[EngineProcess]:
        return [o.engine for o in self._owners.values() if o.engine is not None]

    def _emit(self, upstream: Upstream, tail: list[str] | None = None) -> None:
        if self.on_event is None:
            return
        event = EngineEvent(upstream, upstream.state, upstream.message, tuple(tail or ()))
        try:
            self.on_event(event)
        except Exception:
            log.exception("progress callback failed")

    async def start(self) -> None:
        """Start one owner per managed engine, and one probing each remote endpoint, and
        return at once (engines load in the background; watch the registry or the
        events to see them become ready)."""
        if self._session is not None or self._stopped:
            return
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        for upstream in self.registry.all():
            if upstream.state is not State.UNLOADED:  # on-demand ones wait to be asked for
                self.ensure(upstream, "fleet up")

    def ensure(self, upstream: Upstream, reason: str = "reload", load_once: bool = False) -> None:
        """Own `upstream` from now on: start its engine (or probe the remote endpoint).
        Nothing happens when it is owned already (and not finished), or when stopping.
        `load_once`: a failed first start is final (see `_Owner`)."""
        owner = self._owners.get(upstream)
        if self._stopped or self._session is None:
            return
        if owner is not None:
            if owner.task is not None and not owner.task.done():
                return
            del self._owners[upstream]  # it had failed: a new owner starts it again
        stop = asyncio.Event()
        if not upstream.managed:
            if self._probe_session is None:
                # Kept alive between probes (under uvicorn's 5 s): one connection per
                # endpoint, not one per probe.
                connector = aiohttp.TCPConnector(keepalive_timeout=4.0)
                self._probe_session = aiohttp.ClientSession(connector=connector)
            owner = _Owner(upstream, stop, None, reason)
            watch = watch_remote(
                upstream, self._probe_session, self.config.engines.health_interval,
                stop, self._emit,
            )  # fmt: skip
            owner.task = asyncio.create_task(watch, name=f"probe {upstream.name}")
        elif isinstance(upstream.spec, EngineSpec):
            if upstream.state in (State.FAILED, State.STOPPED, State.UNLOADED):
                # Starting from now on: whoever waits for it must not read the state of
                # the engine's last life (a failure) before its new owner has run.
                upstream.set_state(State.STARTING, "starting")
            engine = EngineProcess(upstream.spec, upstream, self.config.engines, self._session)
            engine.before_ready = self.adapters.on_healthy
            owner = _Owner(upstream, stop, engine, reason, load_once=load_once)
            owner.task = asyncio.create_task(self._own(owner), name=upstream.name)
        else:  # pragma: no cover (a managed upstream always has an EngineSpec)
            return
        self._owners[upstream] = owner

    def owns(self, upstream: Upstream) -> bool:
        owner = self._owners.get(upstream)
        return owner is not None and owner.task is not None and not owner.task.done()

    async def retire(
        self,
        upstream: Upstream,
        drain: float,
        cut_short: asyncio.Event | None = None,
        reason: str = "reload",
    ) -> None:
        """Drain and stop one upstream, already out of routing: requests in flight get
        up to `drain` seconds to finish (or until `cut_short`), then its engine is
        stopped by the usual sequence and its owner is gone. `reason`: what the stop
        is counted as (fleet_engine_stops_total)."""
        owner = self._owners.get(upstream)
        if owner is None:
            return
        deadline = time.monotonic() + drain
        while upstream.outstanding > 0 and time.monotonic() < deadline:
            if self._stop.is_set() or (cut_short is not None and cut_short.is_set()):
                break
            await asyncio.sleep(0.05)
        if upstream.outstanding > 0:
            log.warning(
                "%s: %d request(s) still in flight after the %gs drain; stopping it",
                upstream.name, upstream.outstanding, drain,
            )  # fmt: skip
        owner.stop_reason = reason
        owner.stop.set()
        if owner.task is not None:
            await asyncio.gather(owner.task, return_exceptions=True)
        if owner.engine is not None:
            await owner.engine.stop()
        if self._owners.get(upstream) is owner:  # not a new owner started meanwhile
            del self._owners[upstream]
            self.adapters.forget(upstream)

    def cannot_restart(self, upstream: Upstream) -> str | None:
        """Why `restart(upstream)` would be refused now; None when it may restart."""
        if self._stopped or self._session is None:
            return "the fleet is stopping"
        if not upstream.managed:
            return f"{upstream.name} is a remote endpoint ({upstream.url}), not run by the fleet"
        if upstream.state in (State.UNLOADED, State.UNLOADING, State.SLEEPING):
            return (
                f"{upstream.name} is {upstream.state.value} (start: on_demand); load "
                f"`{upstream.deployment}` instead"
            )
        if upstream.state is State.STOPPING:
            return f"{upstream.name} is stopping already"
        return None

    def restart(self, upstream: Upstream, drain: float) -> str | None:
        """Restart one engine by hand (an admin asked): None once under way, else why not
        (`cannot_restart`). It is out of the rotation at once (stopping, so a second ask
        is refused), its requests in flight get up to `drain` seconds, then the stop
        sequence and a fresh start, counted as a restart; a failed engine is started
        again, its failures in a row forgotten."""
        why = self.cannot_restart(upstream)
        if why is not None:
            return why
        upstream.set_state(State.STOPPING, "restarting (asked by an admin)")
        self._emit(upstream)
        task = asyncio.create_task(self._restart(upstream, drain), name=f"restart {upstream.name}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        return None

    async def _restart(self, upstream: Upstream, drain: float) -> None:
        await self.retire(upstream, drain, reason="restart")
        # Meanwhile a reload may have removed it, or a swap unloaded it: then it stays so.
        if (
            self._stopped
            or upstream not in self.registry.all()
            or upstream.state not in (State.STOPPING, State.STOPPED)
            or self.owns(upstream)
        ):
            return
        upstream.restarts += 1
        self.ensure(upstream, "restart")

    async def sync_adapters(self, upstream: Upstream, drain: float) -> list[str] | None:
        """Load and unload LoRA adapters on a ready engine to match the fleet file (see
        engines/adapters.py): the failures, in words; None when the engine is not ready
        (one that starts gets its adapters before it is ready)."""
        engine = self.engine_of(upstream)
        if engine is None or not engine.running or upstream.state is not State.READY:
            return None
        return await self.adapters.sync(engine, drain)

    # ------------------------------------------------------------ on demand

    async def unload(self, upstream: Upstream, reason: str, message: str) -> None:
        """Stop an on-demand engine (drained already) and mark it unloaded: it starts
        again only when `ensure()`d."""
        await self.retire(upstream, 0.0, reason=reason)
        upstream.set_state(State.UNLOADED, message)
        self._emit(upstream)

    def engine_of(self, upstream: Upstream) -> EngineProcess | None:
        owner = self._owners.get(upstream)
        if owner is None or owner.task is None or owner.task.done():
            return None
        return owner.engine

    async def sleep(self, upstream: Upstream, level: int) -> str | None:
        """Put a ready engine (drained already) to sleep at `level`: None when it sleeps,
        else why not (the caller stops it instead)."""
        engine = self.engine_of(upstream)
        if engine is None or not engine.running:
            return "its engine is not running"
        problem = await sleep_mode.sleep(engine, level)
        if problem is None:
            upstream.set_state(State.SLEEPING, f"asleep at level {level}")
            engine.note(f"put to sleep at level {level}")
            self._emit(upstream)
        return problem

    async def wake(self, upstream: Upstream, level: int) -> str | None:
        """Wake a sleeping engine: None once it serves again (ready), else why not (the
        caller stops it and starts it cold)."""
        engine = self.engine_of(upstream)
        if engine is None or not engine.running:
            return "its engine is not running"
        upstream.set_state(State.STARTING, f"waking from sleep level {level}")
        self._emit(upstream)
        began = time.monotonic()
        problem = await sleep_mode.wake(engine, level)
        if problem is None and self.engine_of(upstream) is engine:
            # Asleep through a reload, it may miss an adapter or hold a removed one.
            await self.adapters.sync(engine, 0.0)
            upstream.set_state(State.READY, f"woken in {time.monotonic() - began:.1f}s")
            engine.note(f"woken from sleep level {level}")
            self._emit(upstream)
            return None
        return problem or "its engine stopped while waking"

    async def until_ready(self, upstream: Upstream) -> bool:
        """Wait until `upstream` is ready (True), or has failed or stopped for good."""
        while True:
            if upstream.state is State.READY:
                return True
            owner = self._owners.get(upstream)
            if upstream.state is State.FAILED or owner is None or owner.task is None:
                return False
            if owner.task.done() or self._stop.is_set():
                return False
            await asyncio.sleep(0.1)

    def apply_settings(self, config: FleetConfig) -> None:
        """The new fleet file's `engines.*` settings, for every engine from now on."""
        self.config = config
        for owner in self._owners.values():
            if owner.engine is not None:
                owner.engine.settings = config.engines

    async def wait_settled(self) -> None:
        """Return once no engine is starting (each is ready, failed or stopped)."""
        while any(e.upstream.state in (State.STARTING, State.STOPPED) for e in self.engines):
            tasks = [o.task for o in self._owners.values() if o.task is not None]
            if self._stop.is_set() or all(t.done() for t in tasks):
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop every engine concurrently (TERM the group, grace, KILL, reap) and wait
        for all of them. Idempotent; engines still loading are stopped too."""
        self._stop.set()
        self._stopped = True
        for restart in list(self._restarts):  # its engine is stopped with the others
            restart.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        owners = list(self._owners.values())
        for owner in owners:
            owner.stop.set()
        tasks = [o.task for o in owners if o.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # A task that died of a bug must not leave its engine behind.
        await asyncio.gather(*(e.stop() for e in self.engines), return_exceptions=True)
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()

    def kill_now(self) -> None:
        """Skip the grace period: SIGKILL every engine's group (a second Ctrl-C)."""
        for engine in self.engines:
            # upstream.pid is cleared only once the group is gone and the engine reaped;
            # until then its workers may outlive the engine itself.
            if engine.proc is not None and engine.upstream.pid is not None:
                killpg(engine.proc.pid, signal.SIGKILL)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def _own(self, owner: _Owner) -> None:
        engine = owner.engine
        assert engine is not None
        try:
            await self._run(owner, engine)
        except Exception as exc:
            log.exception("%s: supervisor task failed", engine.spec.name)
            engine.upstream.set_state(State.FAILED, f"supervisor error: {exc}")
            self._emit(engine.upstream)
        finally:
            running = engine.running
            await asyncio.shield(engine.stop())
            await engine.close()
            if running:
                self.registry.count_stop(engine.spec.deployment, owner.stop_reason)
            if engine.upstream.state not in (State.FAILED, State.UNLOADED):
                engine.upstream.set_state(State.STOPPED, "stopped")
                self._emit(engine.upstream)

    async def _run(self, owner: _Owner, engine: EngineProcess) -> None:
        stop = owner.stop
        upstream = engine.upstream
        failures = 0
        while not stop.is_set():
            # Read each time: a reload may give the engine new settings or, for the same
            # process, a new spec (log file, timeouts) for its next start.
            settings, spec = engine.settings, engine.spec
            reason = listen_problem(spec, settings)
            if reason is not None:
                if engine.attempts == 0:
                    upstream.set_state(State.FAILED, reason)
                    log.error("%s: %s", spec.name, reason)
                    self._emit(upstream)
                    return
                why = reason
            else:
                try:
                    await engine.start()
                    self.registry.count_start(
                        spec.deployment, owner.reason if engine.attempts <= 1 else "restart"
                    )
                except SpawnError as exc:
                    upstream.set_state(State.FAILED, str(exc))
                    log.error("%s: %s", spec.name, exc)
                    self._emit(upstream)
                    return
                self._emit(upstream)
                outcome = await engine.wait_ready(stop)
                if outcome is Outcome.READY:
                    owner.load_once = False  # loaded: restarted as any engine from now on
                    self._emit(upstream)
                    ready_at = time.monotonic()
                    outcome = await engine.watch(stop)
                    if time.monotonic() - ready_at >= settings.stable_after:
                        failures = 0
                if outcome is Outcome.STOPPED:
                    return
                why = _describe(outcome, engine)
                if upstream.state in (State.SLEEPING, State.UNLOADING):
                    # An on-demand engine that was asleep or making room: not restarted
                    # (it would take the GPUs back); it loads again when asked for.
                    log.warning("%s: %s while %s; unloaded", spec.name, why, upstream.state)
                    engine.note(f"stopping it: {why} while {upstream.state.value}")
                    await engine.stop()
                    self.registry.count_stop(spec.deployment, "failure")
                    upstream.last_failure, upstream.last_failure_at = why, time.time()
                    upstream.set_state(State.UNLOADED, f"unloaded: {why}")
                    self._emit(upstream)
                    return
                log.warning("%s: %s", spec.name, why)
                if outcome is Outcome.STALLED:
                    upstream.stalls += 1
                    upstream.set_state(State.STALLED, why)  # out of the rotation
                    self._emit(upstream)
                if outcome is not Outcome.EXITED:  # the fleet stops it: say why, in its log
                    engine.note(f"stopping it: {why}")
                    await engine.stop()
                    self.registry.count_stop(spec.deployment, "failure")
                await engine.stop()
                if stop.is_set():
                    return
            upstream.last_failure, upstream.last_failure_at = why, time.time()
            failures += 1
            if failures > (0 if owner.load_once else settings.max_restarts):
                tail = read_log_tail(spec.log_path)
                message = f"{why}; gave up after {failures} failure(s) in a row"
                upstream.set_state(State.FAILED, message)
                log.error(
                    "%s: failed: %s; last lines of %s:\n%s",
                    spec.name,
                    message,
                    spec.log_path,
                    "\n".join(tail) or "(empty)",
                )
                self._emit(upstream, tail)
                return
            delay = min(settings.backoff_initial * 2 ** (failures - 1), settings.backoff_max)
            upstream.set_state(
                State.STARTING,
                f"{why}; restarting in {delay:g}s "
                f"(restart {failures} of at most {settings.max_restarts} in a row)",
            )
            upstream.retry_at = time.time() + delay
            self._emit(upstream)
            try:
                await self._sleep(stop, delay)
            finally:
                upstream.retry_at = None
            if stop.is_set():
                return
            upstream.restarts += 1
