"""One engine process: start it, wait until it is ready, watch it, stop it.

States (written into the engine's `registry.Upstream`):

    stopped --start()--> starting --/health 200, `before_ready`--> ready
    ready --busy, no token progress for stall_timeout--> stalled (engines/stall.py)
    starting|ready --stop()--> stopping --> stopped     (stalled --stop()--> stopped)
    (the supervisor decides what an exit means: restart -> starting, or failed)

While ready, every `engines.health_interval` the engine's `/health` is checked and its
`/metrics` read (engines/vllm_metrics.py): the load it shows goes into the registry (the
status page, the routing policies) and, when its spec has a `stall_timeout`, busy with
no token computed for that long is a stall. An engine whose /metrics lacks vLLM's
metrics is left to the health check (said once in the log when it has a stall_timeout).

The stop sequence, always the same:

1. SIGTERM to the engine's process group (the engine runs in its own session, so its
   group holds the engine and every worker it spawned);
2. wait up to `engines.stop_timeout` seconds for the whole group to exit;
3. SIGKILL the group, wait for it to vanish;
4. reap the engine (`await proc.wait()`), so no zombie is left.

A group that is already gone (ProcessLookupError) is simply done.

On Linux each engine is also started with `PR_SET_PDEATHSIG = SIGKILL`, so it dies if the
`fleet up` process is killed outright (SIGKILL, OOM killer), when no stop sequence can
run. The kernel applies it to the direct child only, and fires when the thread that
started it exits (the event loop's thread): processes the engine spawns (vLLM's engine
core and workers) are not covered by it; vLLM's own children watch their parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import aiohttp

from vllm_fleet.config import EnginesConfig
from vllm_fleet.engines import sockets
from vllm_fleet.engines.logs import rotate_if_over
from vllm_fleet.engines.stall import Progress, judge
from vllm_fleet.engines.vllm_metrics import EngineLoad, parse_load
from vllm_fleet.masking import mask_argv
from vllm_fleet.plan import EngineSpec
from vllm_fleet.registry import State, Upstream

log = logging.getLogger(__name__)

# A line written into the engine's log before each start; the tail shown after a
# failure starts after the last one, so it is about the last attempt only.
LOG_MARK = "---- vllm-fleet:"
# Consecutive failed health checks of a ready engine that count as a failure.
UNHEALTHY_AFTER = 3
# While an engine loads, /health is polled this often (or health_interval, if shorter).
START_POLL_INTERVAL = 0.5
START_POLL_TIMEOUT = 2.0
# Generous: a busy engine answers /health late, and restarting it would lose its work.
READY_POLL_TIMEOUT = 10.0
# After SIGKILL, how long to wait for the group to vanish before giving up on it.
KILL_WAIT = 5.0
# A /metrics page is a few hundred lines; read at most this much of it.
METRICS_MAX_BYTES = 4 * 2**20


class Outcome(enum.Enum):
    """Why waiting on an engine ended."""

    READY = "ready"
    EXITED = "exited"
    TIMEOUT = "timeout"
    UNHEALTHY = "unhealthy"
    STALLED = "stalled"  # busy without token progress for its stall_timeout
    STOPPED = "stopped"  # the fleet is stopping


class SpawnError(Exception):
    """The engine could not be started at all; retrying would not help."""


def _spawn_problem(program: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return (
            f"cannot run `{program}`: not found. Is vLLM installed in this environment? "
            "Otherwise set `engine_command` (or the deployment's `command`) to how vLLM runs "
            'here, e.g. ["{python}", "-m", "vllm.entrypoints.openai.api_server", "--model", '
            '"{model}"]'
        )
    if isinstance(exc, PermissionError):
        return f"cannot run `{program}`: permission denied (not executable?)"
    return f"cannot run `{program}`: {exc.strerror or exc}"


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn setting PR_SET_PDEATHSIG=SIGKILL in the child (Linux only).

    Everything it needs is resolved before fork; in the child it only calls prctl and
    getppid. If the parent already died between fork and prctl, the child exits."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The number was reused by someone else's group: ours is gone.
        return False
    return True


def _open_log(spec: EngineSpec, attempt: int) -> BinaryIO:
    """Open the engine's log for appending, after a line marking this start."""
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(spec.log_path, "ab", buffering=0)  # noqa: SIM115 (the caller closes it)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    logf.write(f"{LOG_MARK} start {attempt} of {spec.name} at {stamp}\n".encode())
    logf.write(f"{LOG_MARK} argv: {' '.join(mask_argv(spec.argv))}\n".encode())
    return logf


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is still in process group `pgid`.

    On Linux this reads /proc, because a killed worker that its new parent has not
    reaped yet (a zombie) still counts for `killpg(pgid, 0)` but holds nothing. Elsewhere
    `killpg(pgid, 0)` is the answer."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return killpg(pgid, 0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


class EngineProcess:
    """One engine process and its state; driven by one supervisor task."""

    def __init__(
        self,
        spec: EngineSpec,
        upstream: Upstream,
        settings: EnginesConfig,
        session: aiohttp.ClientSession,
    ) -> None:
        self.spec = spec
        self.upstream = upstream
        self.settings = settings
        self.session = session
        # An engine on a Unix socket is checked through a session of its own, whose
        # connector opens that socket (aiohttp's UnixConnector serves one path).
        self._uds_session: aiohttp.ClientSession | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._stopped = False  # the last started process went through stop()
        self.started_at = 0.0  # time.monotonic() of the last start
        self.attempts = 0
        # Run once a new process is healthy, before it counts as ready (the supervisor
        # loads its LoRA adapters there: engines/adapters.py).
        self.before_ready: Callable[[EngineProcess], Awaitable[None]] | None = None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Spawn the engine in its own session, output appended to its log file."""
        spec = self.spec
        self.attempts += 1
        self.upstream.set_state(State.STARTING, "starting")
        self.upstream.pid = None
        settings = self.settings
        # A log left over its size by the last run is rotated first (in a thread).
        await asyncio.to_thread(
            rotate_if_over, spec.log_path, settings.log_max_bytes, settings.log_keep
        )
        try:
            logf = _open_log(spec, self.attempts)
        except OSError as exc:
            raise SpawnError(
                f"cannot write its log {spec.log_path} ({exc.strerror or exc}); set "
                "engines.log_dir to a writable directory"
            ) from None
        with logf:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    env=os.environ | dict(spec.env),
                    cwd=spec.cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec(),
                )
            except OSError as exc:
                message = _spawn_problem(spec.argv[0], exc)
                logf.write(f"{LOG_MARK} {message}\n".encode())
                raise SpawnError(message) from None
        self.started_at = time.monotonic()
        self.upstream.pid = self.proc.pid
        self._exited = asyncio.ensure_future(self.proc.wait())
        self._stopped = False
        log.info("%s: started pid %d, log %s", spec.name, self.proc.pid, spec.log_path)

    def note(self, text: str) -> None:
        """Append a line of the fleet's own to the engine's log (a LOG_MARK line, left
        out of the tails shown after failures)."""
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            with open(self.spec.log_path, "ab") as logf:
                logf.write(f"{LOG_MARK} {self.spec.name} at {stamp}: {text}\n".encode())
        except OSError as exc:
            log.warning("%s: cannot write to its log: %s", self.spec.name, exc)

    async def _wait(self, seconds: float, stop: asyncio.Event) -> bool:
        """Sleep up to `seconds`; True when the engine exited or the fleet is stopping."""
        assert self._exited is not None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait(
                {self._exited, stopping}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()
        return bool(done)

    def client(self, path: str) -> tuple[aiohttp.ClientSession, str]:
        """The session and URL that reach `path` on the engine (its socket, or TCP)."""
        uds = self.spec.uds
        if uds is None:
            return self.session, f"{self.spec.url}{path}"
        if self._uds_session is None:
            connector = aiohttp.UnixConnector(path=str(uds), force_close=True)
            self._uds_session = aiohttp.ClientSession(connector=connector)
        return self._uds_session, f"http://localhost{path}"

    async def close(self) -> None:
        """After the last stop: close the socket's session, remove the socket file."""
        if self._uds_session is not None:
            await self._uds_session.close()
            self._uds_session = None
        if self.spec.uds is not None and self.proc is not None and not self.running:
            sockets.remove(self.spec.uds)

    async def _health(self, timeout: float) -> str | None:
        """None when /health answers 200, else why not."""
        session, url = self.client("/health")
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as resp:
                await resp.read()
                return None if resp.status == 200 else f"/health answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Said in words, never as Python's class name: it reaches clients in the 503.
            return f"/health: {exc or f'no answer within {timeout:g} s'}"

    async def _load(self, timeout: float) -> EngineLoad | str:
        """The engine's load from /metrics, or why there is none: a str starting
        "no vLLM metrics" when the page lacks them, else the failed read."""
        session, url = self.client("/metrics")
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
            ) as resp:
                # The whole page (up to the limit): read(n) would return only what has
                # arrived so far, and a busy engine sends its page in pieces.
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(65536):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= METRICS_MAX_BYTES:
                        break
                body = b"".join(chunks)
                if resp.status == 404:  # no such page: not vLLM
                    return "no vLLM metrics: /metrics answered 404"
                if resp.status != 200:  # a passing failure: read again next time
                    return f"/metrics answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"/metrics: {exc or f'no answer within {timeout:g} s'}"
        load = parse_load(body.decode("utf-8", errors="replace"))
        return load if load is not None else "no vLLM metrics in its /metrics page"

    async def _probe(self, timeout: float, stop: asyncio.Event) -> tuple[bool, str | None]:
        """One health check, abandoned early if the engine exits or the fleet stops.
        Returns (interrupted, problem)."""
        assert self._exited is not None
        check = asyncio.ensure_future(self._health(timeout))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({check, self._exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not check.done():
            check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await check
            return True, None
        return False, check.result()

    async def wait_ready(self, stop: asyncio.Event) -> Outcome:
        """Poll /health until 200 (READY), the process exits, the start timeout passes,
        or the fleet stops. Refused connections while the model loads are normal."""
        interval = min(START_POLL_INTERVAL, self.settings.health_interval)
        deadline = self.started_at + self.spec.start_timeout
        while True:
            if stop.is_set():
                return Outcome.STOPPED
            if not self.running:
                return Outcome.EXITED
            began = time.monotonic()
            interrupted, problem = await self._probe(START_POLL_TIMEOUT, stop)
            if interrupted:
                continue
            if problem is None:
                if self.spec.uds is not None and self.settings.socket_group is not None:
                    shared = sockets.share(self.spec.uds, self.settings.socket_group)
                    if shared is not None:
                        log.error("%s: %s", self.spec.name, shared)
                if self.before_ready is not None:
                    await self.before_ready(self)
                    if not self.running:
                        return Outcome.EXITED
                elapsed = time.monotonic() - self.started_at
                self.upstream.readmit(began)  # an ejection before this start is void
                self.upstream.set_state(State.READY, f"ready after {elapsed:.1f}s")
                log.info("%s: ready after %.1fs", self.spec.name, elapsed)
                return Outcome.READY
            if time.monotonic() >= deadline:
                return Outcome.TIMEOUT
            await self._wait(min(interval, max(0.0, deadline - time.monotonic())), stop)

    async def watch(self, stop: asyncio.Event) -> Outcome:
        """Health-check a ready engine every `health_interval` until it exits (EXITED),
        fails UNHEALTHY_AFTER checks in a row (UNHEALTHY), is found stalled (STALLED; the
        reason in `upstream.message`) or the fleet stops. A check that passes readmits an
        engine the gateway ejected before the check began."""
        failures = 0
        stall_timeout = self.spec.stall_timeout
        read_metrics = True  # until its /metrics is found to lack vLLM's metrics
        progress = Progress()
        while True:
            if await self._wait(self.settings.health_interval, stop):
                return Outcome.STOPPED if stop.is_set() else Outcome.EXITED
            settings = self.settings
            path, limit, keep = self.spec.log_path, settings.log_max_bytes, settings.log_keep
            # In a thread: copying a 100 MB log must not stall the gateway's streams.
            if await asyncio.to_thread(rotate_if_over, path, limit, keep):
                log.info("%s: log over %g MB, rotated", self.spec.name, settings.log_max_mb)
            began = time.monotonic()
            interrupted, problem = await self._probe(READY_POLL_TIMEOUT, stop)
            if interrupted:
                continue
            if problem is None:
                failures = 0
                if self.upstream.readmit(began):
                    log.warning("%s: health check passed: back in the rotation", self.spec.name)
                if not read_metrics:
                    continue
                load = await self._load(READY_POLL_TIMEOUT)
                if isinstance(load, str):
                    if load.startswith("no vLLM metrics"):
                        if stall_timeout is not None:
                            log.warning("%s: %s; left to its health check", self.spec.name, load)
                        stall_timeout, read_metrics = None, False
                    # A failed read is no reading: the clock runs on from the last one.
                    continue
                self.upstream.read_load(load)
                if stall_timeout is None:
                    continue
                verdict = judge(progress, load, time.monotonic(), stall_timeout)
                progress = verdict.progress
                if verdict.reason is not None:
                    self.upstream.message = verdict.reason
                    return Outcome.STALLED
                continue
            failures += 1
            log.warning(
                "%s: health check failed (%d/%d): %s",
                self.spec.name,
                failures,
                UNHEALTHY_AFTER,
                problem,
            )
            if failures >= UNHEALTHY_AFTER:
                self.upstream.message = f"unhealthy: {problem}"
                return Outcome.UNHEALTHY

    async def _group_gone(self, pgid: int, timeout: float) -> bool:
        """Wait until the engine is reaped and its process group is empty."""
        assert self._exited is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if not self._exited.done():
                await asyncio.wait({self._exited}, timeout=max(0.0, min(left, 0.1)))
            if self._exited.done() and not group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            if self._exited.done():
                await asyncio.sleep(min(0.1, max(0.0, left)))

    async def stop(self) -> None:
        """The stop sequence (see the module docstring). Safe to call at any time, any
        number of times; also cleans up workers left behind by an engine that exited."""
        proc, exited = self.proc, self._exited
        if proc is None or exited is None or self._stopped:
            return  # never started, or already stopped (its group number may be reused)
        pgid = proc.pid  # start_new_session: the engine leads its own group
        if proc.returncode is None and self.upstream.state is not State.STALLED:
            # A stalled engine stays `stalled` (with its reason) until it is gone.
            self.upstream.set_state(State.STOPPING, "stopping")
        name, grace = self.spec.name, self.settings.stop_timeout
        if killpg(pgid, signal.SIGTERM):
            log.info("%s: SIGTERM to process group %d", name, pgid)
            if not await self._group_gone(pgid, grace):
                log.warning("%s: still running %.0fs after SIGTERM; SIGKILL", name, grace)
                killpg(pgid, signal.SIGKILL)
                if not await self._group_gone(pgid, KILL_WAIT):
                    log.error("%s: process group %d survived SIGKILL", name, pgid)
        await exited  # always reap
        self._stopped = True
        if self.upstream.state is not State.FAILED:
            self.upstream.set_state(State.STOPPED, f"exited with status {proc.returncode}")
        self.upstream.pid = None
