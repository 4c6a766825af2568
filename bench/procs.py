"""Processes under test: starting them pinned to cores, and reading their CPU and memory.

CPU time and memory come straight from /proc (no psutil): `utime + stime` of every
process in a tree, and the sum of their resident set sizes (`VmRSS`; `VmHWM` for the
kernel's own high-water mark).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cores:
    """Which CPUs the load generator, the upstream and the proxy under test run on."""

    loadgen: frozenset[int]
    upstream: frozenset[int]
    proxy: frozenset[int]

    @classmethod
    def plan(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 3:  # each its own core
            return cls(frozenset({cpus[0]}), frozenset({cpus[1]}), frozenset(cpus[2:3]))
        if len(cpus) == 2:  # the proxy alone on one core; load and upstream share the other
            return cls(frozenset({cpus[0]}), frozenset({cpus[0]}), frozenset({cpus[1]}))
        every = frozenset(cpus)
        return cls(every, every, every)

    def describe(self) -> str:
        def fmt(cpus: frozenset[int]) -> str:
            return ",".join(map(str, sorted(cpus)))

        return (
            f"load generator on CPU {fmt(self.loadgen)}, upstream on CPU {fmt(self.upstream)}, "
            f"proxy under test on CPU {fmt(self.proxy)}"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found.extend(int(c) for c in text.split())
    return found


def tree(pid: int) -> list[int]:
    """`pid` and every descendant alive now."""
    pids = [pid]
    index = 0
    while index < len(pids) and len(pids) < 10_000:
        pids.extend(children(pids[index]))
        index += 1
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of the machine spent busy (not idle or iowait) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_bytes(pids: Sequence[int]) -> int:
    return sum(_status_kib(pid, "VmRSS:") for pid in pids) * 1024


def hwm_bytes(pids: Sequence[int]) -> int:
    return sum(_status_kib(pid, "VmHWM:") for pid in pids) * 1024


def pin(pids: Sequence[int], cpus: frozenset[int]) -> None:
    """Pin every thread of every process in `pids` to `cpus`."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout:g} s (log: {log})")


class Managed:
    """A child process in its own process group, pinned to `cpus`, logging to a file.

    It stays in our session, so with the kernel's autogroup scheduling it shares our
    group and its priority (see bench.run.raise_priority)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cpus: frozenset[int],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.cpus = cpus
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                process_group=0,  # own group, same session: same scheduler autogroup as us
                preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return tree(self.proc.pid)

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        wait_port(port, self.proc, timeout, self.log)
        pin(self.pids(), self.cpus)  # threads or workers started after the fork, too

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to the process group, wait `grace`, SIGKILL the group, reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        return self.proc.returncode


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Sampler:
    """Samples the RSS of a process tree every `interval` seconds while running."""

    def __init__(self, pids: Sequence[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.peak = max(self.peak, rss_bytes(self.pids))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sample()
