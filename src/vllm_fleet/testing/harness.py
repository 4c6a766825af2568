"""Small helpers for tests that run real processes on 127.0.0.1: free ports, waiting for
a port to open, a fake engine started as a subprocess (`FakeEngine`, on a port or a Unix
socket), asking an engine directly by its URL (`engine_request`: `http://` or the fleet's
`unix:/path`), and the settings a fleet file of fake engines uses (`FAKE_ENGINE`,
`FAST_ENGINES`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

# The fake engine, as an `engine_command` template.
FAKE_ENGINE = ["{python}", "-m", "vllm_fleet.testing.fake_vllm", "{model}"]

# Engine settings that keep tests quick: fast backoff and health checks, short grace.
FAST_ENGINES: dict[str, Any] = {
    "health_interval": 0.2,
    "backoff_initial": 0.1,
    "backoff_max": 0.5,
    "stop_timeout": 5,
    "start_timeout": 30,
}


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice for 127.0.0.1:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports that are all free right now."""
    for _ in range(100):
        first = free_port()
        if first + count > 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    # As the engines' servers bind: ports held only by connections in
                    # TIME_WAIT (plenty after a full run) are free to them.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((host, port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"found no {count} consecutive free ports")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until `port` accepts connections; fail early when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (`Host: localhost`, as the gateway sends)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def engine_request(
    url: str, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One request straight to an engine at `url` (`http://host:port` or `unix:/path`, as
    the fleet's status lists it): its status and body. OSError when nobody is there."""
    conn: http.client.HTTPConnection
    if url.startswith("unix:"):
        conn = UnixHTTPConnection(url[len("unix:") :], timeout)
    else:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def engine_json(url: str, path: str, method: str = "GET", timeout: float = 10.0) -> Any:
    """GET (or `method`) `path` on an engine and decode its JSON; AssertionError unless 200."""
    status, body = engine_request(url, path, method, b"" if method == "POST" else None, timeout)
    assert status == 200, body[:500]
    return json.loads(body)


def wait_socket(
    path: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until the Unix socket `path` accepts connections; fail early when `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(path)
                return
            except OSError:
                pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} opened")
        time.sleep(0.05)
    raise TimeoutError(f"socket {path} did not open within {timeout}s")


def fake_vllm_argv(model: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vllm_fleet.testing.fake_vllm",
        model,
        "--port",
        str(port),
        *extra,
    ]


class FakeEngine:
    """A fake vLLM engine subprocess: `with FakeEngine("org/m", ["m"]) as eng: eng.url`."""

    def __init__(
        self,
        model: str,
        names: Sequence[str] = (),
        *extra: str,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        uds: str | None = None,
    ) -> None:
        """`uds`: listen on this Unix socket (`--uds`), on no TCP port."""
        self.port = port or free_port()
        self.uds = uds
        names_args = ["--served-model-name", *names] if names else []
        where = ("--uds", uds) if uds is not None else ()
        self.argv = fake_vllm_argv(model, self.port, *names_args, *where, *extra)
        self.env = {**os.environ, **(env or {})}
        self.wait = wait
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix:{self.uds}" if self.uds is not None else f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeEngine:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if self.wait and self.uds is not None:
            wait_socket(self.uds, proc=self.proc)
        elif self.wait:
            wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> FakeEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
