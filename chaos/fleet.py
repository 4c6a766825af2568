"""`fleet up` with fake engines, run as a user runs it, and what it leaves behind.

Every fleet gets a marker (a unique string in its engines' model names), so any engine
process still alive after `fleet up` exited is found by its command line in /proc,
whichever process group or session it ended up in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.testing.harness import FAKE_ENGINE, FAST_ENGINES, free_port


def new_marker(prefix: str) -> str:
    return f"chaos-{prefix}-{uuid.uuid4().hex[:10]}"


def write_fleet_file(
    workdir: Path, marker: str, replicas: int, args: list[str], **gateway: Any
) -> Path:
    """One deployment `chat` of `replicas` fake engines whose model names carry `marker`."""
    data = {
        "gateway": {"host": "127.0.0.1", "port": free_port(), **gateway},
        "engines": {**FAST_ENGINES, "log_dir": str(workdir / "logs")},
        "engine_command": FAKE_ENGINE,
        "deployments": {
            "chat": {
                "model": f"org/{marker}",
                "replicas": replicas,  # each on a Unix socket (the default)
                "args": args,
            }
        },
    }
    path = workdir / f"{marker}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Fleet:
    """`python -m vllm_fleet.cli up FILE` in its own session, its output in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port: int = yaml.safe_load(path.read_text())["gateway"]["port"]
        self.output = path.with_suffix(".out")
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_fleet.cli", "up", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def status(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.port}/fleet/status"
            with urllib.request.urlopen(url, timeout=2) as answer:
                data: dict[str, Any] = json.load(answer)
                return data
        except OSError:
            return None

    def upstreams(self) -> list[dict[str, Any]]:
        data = self.status() or {"deployments": {}}
        return [u for dep in data["deployments"].values() for u in dep["upstreams"]]

    def wait_listening(self, timeout: float = 30.0) -> None:
        self._wait(lambda: self.status() is not None, timeout, "the gateway listening")

    def wait_ready(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def ready() -> bool:
            nonlocal found
            found = self.upstreams()
            return len(found) == count and all(u["state"] == "ready" for u in found)

        self._wait(ready, timeout, f"{count} engines ready")
        return found

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise RuntimeError(f"`fleet up` exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {what} within {timeout:g} s:\n{self.text()[-2000:]}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit; its status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Last resort after a failed scenario: the whole session goes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def leftovers(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = entry.joinpath("cmdline").read_bytes()
            stat = entry.joinpath("stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and stat[stat.rfind(")") + 2] not in "ZX":
            found.append(int(entry.name))
    return found


def sweep(marker: str) -> None:
    for pid in leftovers(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
