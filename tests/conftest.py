"""Helpers shared by tests that run real processes on 127.0.0.1.

Import them directly (`from tests.conftest import free_port, fake_fleet_file, wait_until`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vllm_fleet.testing.harness import FAKE_ENGINE, FAST_ENGINES, free_ports

# Re-exported: tests import them from here with the rest.
__all__ = ["FAKE_ENGINE", "FAST_ENGINES", "free_ports"]

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick for host:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def fake_fleet_file(
    tmp_path: Path,
    deployments: dict[str, dict[str, Any]],
    *,
    engines: dict[str, Any] | None = None,
    engine_command: list[str] | None = None,
    name: str = "fleet.yaml",
    **gateway: Any,
) -> Path:
    """Write a fleet file running the fake engine and return its path.

    Engines listen on Unix sockets (the default); a `listen: tcp` deployment gets free
    ports (one per replica) unless it names `port`; `gateway`
    keys override the gateway section (a free port by default); `engines` overrides
    FAST_ENGINES; logs go to tmp_path/logs."""
    deps = {}
    for dep_id, dep in deployments.items():
        dep = dict(dep)
        if "endpoints" not in dep and dep.get("listen") == "tcp":
            dep.setdefault("port", free_ports(int(dep.get("replicas", 1))))
        deps[dep_id] = dep
    data = {
        "gateway": {"host": "127.0.0.1", "port": free_port(), **gateway},
        "engines": {**FAST_ENGINES, "log_dir": str(tmp_path / "logs"), **(engines or {})},
        "engine_command": engine_command or FAKE_ENGINE,
        "deployments": deps,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not true within {timeout}s: {what or predicate}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group `pgid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = entry.joinpath("stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def listening_ports(pids: list[int]) -> set[int]:
    """TCP ports the processes `pids` listen on (from /proc: their socket inodes)."""
    inodes = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
