"""The upstream and the front ends put in front of it, started the way a user would.

- upstream: `python -m bench.upstream` (the lean vLLM look-alike);
- nginx: the vhost `fleet nginx bench-fleet.yaml --listen 127.0.0.1:PORT` renders, inside
  a main config sized for the benchmark (one worker process, as many connections as the
  scenarios open, no access log), run unprivileged on its own prefix;
- gateway: `fleet up bench-fleet.yaml`, whose one deployment has `endpoints:` pointing at
  the upstream (routed to, never started).

Every process is pinned to its cores from the moment it forks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.procs import Cores, Managed, free_port, python_module
from vllm_fleet.nginx_run import find_nginx

DEPLOYMENT = "bench"
FLEET_FILE = """\
# The benchmark's fleet: one deployment whose engine is already running (the bench upstream).
gateway:
  host: 127.0.0.1
  port: {gateway_port}
  accept_any_model: true
engines:
  log_dir: logs
deployments:
  {deployment}:
    model: bench/model
    endpoints: ["http://127.0.0.1:{upstream_port}"]
"""

# The gateway to an engine it starts itself, over a Unix socket (the default) and over TCP
# (`listen: tcp`): the same lean upstream behind both, each moved to the upstream's cores.
LOCAL_FLEET_FILE = """\
# The benchmark's local fleet: two engines `fleet up` starts, one per way of reaching it.
gateway:
  host: 127.0.0.1
  port: {gateway_port}
  accept_any_model: true
engines:
  log_dir: logs
  socket_dir: {socket_dir}
  stall_timeout: 0
engine_command: [{python}, -m, bench.upstream, --cpus, "{cpus}"]
deployments:
  uds:
    model: bench/model
    env: {{PYTHONPATH: {root}}}
  tcp:
    model: bench/model
    listen: tcp
    env: {{PYTHONPATH: {root}}}
"""
LOCAL = {"gateway-uds": "uds", "gateway-tcp": "tcp"}  # front -> deployment

# The same fleet with a key on every request: limits the run never reaches (so every
# request pays for their checks and headers), the usage ledger and its meter on, as for
# the plain gateway.
BENCH_KEY = "sk-bench-0123456789"
KEYS = f"""\
  keys:
    - name: bench
      key: {BENCH_KEY}
      rpm: 1000000000
      tpm: 1000000000000
      max_concurrent: 1000000
"""

NGINX_MAIN = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    default_type application/octet-stream;
{temp_paths}
    include {prefix}/vhost.conf;
}}
"""


def fleet_command() -> list[str]:
    """`fleet` as installed next to this interpreter (the console script), else -m."""
    script = Path(sys.executable).with_name("fleet")
    if script.exists():
        return [str(script)]
    return python_module("vllm_fleet.cli")


def write_fleet_file(
    workdir: Path, gateway_port: int, upstream_port: int, keys: bool = False
) -> Path:
    """The benchmark's fleet file (`keys`: with a key and its limits, bench-keys-fleet.yaml)."""
    path = workdir / ("bench-keys-fleet.yaml" if keys else "bench-fleet.yaml")
    text = FLEET_FILE.format(
        gateway_port=gateway_port, upstream_port=upstream_port, deployment=DEPLOYMENT
    )
    if keys:
        text = text.replace("  accept_any_model: true\n", "  accept_any_model: true\n" + KEYS)
    path.write_text(text)
    return path


def write_local_fleet_file(workdir: Path, gateway_port: int, cores: Cores) -> Path:
    """The fleet file of `fleet up` starting the upstream as its two local engines."""
    path = workdir / "bench-local-fleet.yaml"
    sockets = workdir / "s"
    path.write_text(
        LOCAL_FLEET_FILE.format(
            gateway_port=gateway_port,
            socket_dir=sockets,
            python=json.dumps(sys.executable),
            cpus=",".join(map(str, sorted(cores.upstream))),
            # Engines start in the fleet file's folder: `-m bench.upstream` from this tree.
            root=json.dumps(str(Path(__file__).resolve().parents[1])),
        )
    )
    return path


def local_engine_pids(port: int, timeout: float = 60.0) -> dict[str, int]:
    """Wait until every engine of the gateway on `port` is ready: deployment -> pid."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/fleet/status", timeout=10) as r:
            deployments = json.load(r)["deployments"]
        ups = {d: dep["upstreams"][0] for d, dep in deployments.items()}
        if all(u["state"] == "ready" for u in ups.values()):
            return {d: int(u["pid"]) for d, u in ups.items()}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the local engines are not ready: {ups}")
        time.sleep(0.2)


def start_upstream(workdir: Path, cores: Cores) -> tuple[Managed, int]:
    port = free_port()
    upstream = Managed(
        "upstream",
        python_module("bench.upstream", "--port", str(port)),
        cores.upstream,
        workdir / "upstream.log",
    )
    upstream.wait_port(port)
    return upstream, port


def start_nginx(workdir: Path, fleet_file: Path, cores: Cores) -> tuple[Managed, int]:
    """Render the vhost with `fleet nginx`, wrap it in a main config, start nginx."""
    port = free_port()
    prefix = workdir / "nginx"
    if prefix.exists():
        shutil.rmtree(prefix)
    (prefix / "temp").mkdir(parents=True)
    (prefix / "logs").mkdir()
    prefix.chmod(0o755)  # run as root, nginx's worker becomes `nobody`
    rendered = subprocess.run(
        [
            *fleet_command(),
            "nginx",
            str(fleet_file),
            "--listen",
            f"127.0.0.1:{port}",
            "-o",
            str(prefix / "vhost.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if rendered.returncode != 0:
        raise RuntimeError(f"`fleet nginx` failed:\n{rendered.stdout}{rendered.stderr}")
    temp_paths = "\n".join(
        f"    {name}_temp_path {prefix}/temp/{name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix, temp_paths=temp_paths))
    binary = find_nginx()
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    test = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise RuntimeError(f"nginx rejected the rendered config:\n{test.stderr}")
    nginx = Managed("nginx", argv, cores.proxy, workdir / "nginx.log")
    nginx.wait_port(port)
    return nginx, port


def start_gateway(
    workdir: Path,
    fleet_file: Path,
    port: int,
    cores: Cores,
    fleet: list[str] | None = None,
) -> Managed:
    """`fleet up bench-fleet.yaml`; `fleet` replaces the command (to compare a patched one)."""
    argv = [*(fleet or fleet_command()), "up", str(fleet_file)]
    gateway = Managed("gateway", argv, cores.proxy, workdir / f"{fleet_file.stem}.log")
    gateway.wait_port(port, timeout=60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
        if answer.status != 200:
            raise RuntimeError(f"the gateway's /health answered {answer.status}")
    return gateway
