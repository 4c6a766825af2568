"""The gateway under fuzzing: the real `fleet up`, in its own process, in front of the
campaign's recording engine (remote `endpoints:`, so no engine process is started).

Deployments: `raw` (id, alias and model code all route to it), `chat` (two replicas, so
the pick rotates, and a `served_name`), and `down` (an endpoint nothing listens on: 503).
The body limit is small (`MAX_BODY`) so bodies over it are cheap to send.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_fleet.testing.harness import free_port, wait_port

MAX_BODY_MB = 0.0625
MAX_BODY = int(MAX_BODY_MB * 1024 * 1024)  # 64 KiB

# Deployment -> the name its engine serves (what the gateway writes into `model`).
SERVED = {"raw": "org/raw-model", "chat": "chat-served", "down": "org/down-model"}
# Names a client may send as `model` on /v1 routes, and the deployment each resolves to.
MODEL_NAMES = {
    "raw": "raw",
    "org/raw-model": "raw",
    "raw-alias": "raw",
    "chat": "chat",
    "Org/Chat-Model": "chat",
    "chat-served": "chat",
    "down": "down",
}
REPO = Path(__file__).resolve().parents[2]


def fleet_yaml(engine_port: int, gateway_port: int, down_port: int) -> str:
    engine = f"http://127.0.0.1:{engine_port}"
    return f"""\
gateway:
  host: 127.0.0.1
  port: {gateway_port}
  max_body_mb: {MAX_BODY_MB}
engines:
  health_interval: 1
deployments:
  raw:
    model: org/raw-model
    aliases: [raw-alias]
    endpoints: ["{engine}/e/raw"]
  chat:
    model: Org/Chat-Model
    served_name: chat-served
    endpoints: ["{engine}/e/chat", "{engine}/e/chat2"]
  down:
    model: org/down-model
    endpoints: ["http://127.0.0.1:{down_port}"]
"""


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class FleetGateway:
    """`fleet up` on the campaign's fleet file; its output goes to `workdir/fleet-up.log`."""

    def __init__(self, workdir: Path, engine_port: int) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.down_port = free_port()  # nothing listens there
        self.fleet = workdir / "fleet.yaml"
        self.fleet.write_text(fleet_yaml(engine_port, self.port, self.down_port))
        self.log = workdir / "fleet-up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> FleetGateway:
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vllm_fleet.cli", "up", str(self.fleet)],
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_port(self.port, timeout=30, proc=self.proc)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid) if self.alive() else 0

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the gateway's /metrics."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        time.sleep(0)
        return proc.returncode
