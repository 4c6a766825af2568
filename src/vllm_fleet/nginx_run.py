"""The edge around nginx: find the binary, check a rendered vhost with `nginx -t`, and run
an unprivileged nginx on a throwaway prefix (for tests and `fleet nginx --check`).

Nothing here touches /etc/nginx: every run gets its own prefix directory holding the
config, the pid file, the error log and the temp paths.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


class NginxNotFound(RuntimeError):
    pass


def find_nginx() -> str:
    """The nginx binary: on PATH, else the usual sbin places. Raises NginxNotFound."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise NginxNotFound(
        "nginx not found on PATH or in /usr/sbin; install it (Debian: apt-get install nginx)"
    )


def wrap(prefix: Path) -> str:
    """A minimal nginx.conf that includes `vhost.conf`; every writable path is in `prefix`."""
    temp = prefix / "temp"
    lines = [
        "worker_processes 1;",
        "daemon off;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} info;",
        "events { worker_connections 1024; }",
        "http {",
        f"    access_log {prefix / 'access.log'};",
        "    default_type application/octet-stream;",
        *(
            f"    {name}_temp_path {temp / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        ),
        "    include vhost.conf;",
        "}",
        "",
    ]
    return "\n".join(lines)


def prepare(vhost: str, prefix: Path) -> Path:
    """Write nginx.conf + vhost.conf under `prefix`; return the nginx.conf path."""
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    # Run as root, nginx's workers become `nobody`: they must reach the temp paths.
    prefix.chmod(0o755)
    (prefix / "logs").mkdir(exist_ok=True)  # nginx opens its default error log here first
    (prefix / "vhost.conf").write_text(vhost, encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(wrap(prefix), encoding="utf-8")
    return conf


def check(vhost: str, nginx: str | None = None) -> tuple[bool, str]:
    """Run `nginx -t` on the vhost in a throwaway prefix: (accepted, nginx's own output)."""
    binary = nginx or find_nginx()
    with tempfile.TemporaryDirectory(prefix="fleet-nginx-") as tmp:
        prefix = Path(tmp)
        conf = prepare(vhost, prefix)
        done = subprocess.run(
            [binary, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "e.log")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = (done.stdout + done.stderr).replace(str(prefix), "<prefix>")
        return done.returncode == 0, output.strip()


class NginxProcess:
    """An unprivileged nginx in the foreground, on its own prefix; a context manager."""

    def __init__(self, vhost: str, port: int, nginx: str | None = None) -> None:
        self.binary = nginx or find_nginx()
        self.port = port
        self._tmp = tempfile.TemporaryDirectory(prefix="fleet-nginx-")
        self.prefix = Path(self._tmp.name)
        self.conf = prepare(vhost, self.prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> NginxProcess:
        ok, output = check(self.conf.with_name("vhost.conf").read_text(), self.binary)
        if not ok:
            raise RuntimeError(f"nginx rejected the config:\n{output}")
        argv = [self.binary, "-p", str(self.prefix), "-c", str(self.conf)]
        argv += ["-e", str(self.prefix / "error.log")]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx did not open port {self.port}:\n{self.log()}")

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGQUIT (graceful) to the master's group, then SIGKILL; always reap."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGQUIT)
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
