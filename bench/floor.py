"""`python -m bench.floor`: where a Python proxy's time goes, per request and per token.

Runs scenarios (b) and (c) of the benchmark against nginx, three reference proxies
(bench/floor_servers.py: aiohttp's server alone, a bare aiohttp server + client relay,
aiohttp's server + the prototype raw-protocol client, and a relay with no web framework
at all, bench/raw_relay.py) and the gateway (`fleet up`),
each alone on the proxy core, and prints the proxy's CPU per 1,000 requests and per
1,000 relayed tokens (the numbers that noise from other processes moves least), with
requests/s and TTFT for context. Medians of --repeats runs, order rotating each time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import fronts, procs, scenarios
from bench.procs import Cores, Managed
from bench.run import raise_priority, run_loop
from bench.scenarios import Settings, Target

KINDS = ("aiohttp-server", "aiohttp-relay", "lean-relay", "raw-relay")
Metrics = dict[str, dict[str, list[float]]]


async def measure(targets: list[Target], settings: Settings) -> Metrics:
    found: Metrics = {t.name: {} for t in targets}

    def keep(name: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            found[name].setdefault(key, []).append(value)

    for rep in range(settings.repeats):
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        for target in order:
            keep(target.name, await scenarios.requests_per_second(target, settings))
            if target.name != "aiohttp-server":  # it answers by itself, it cannot stream
                keep(target.name, await scenarios.streams(target, settings))
            print(f"  {rep + 1}/{settings.repeats} {target.name}", file=sys.stderr, flush=True)
    return found


def row(name: str, m: dict[str, list[float]]) -> str:
    def med(key: str, fmt: str) -> str:
        return fmt.format(statistics.median(m[key])) if key in m else "—"

    cells = [
        med("proxy_cpu_per_1k_req_s", "{:.3f}"),
        med("proxy_cpu_per_1k_tokens_s", "{:.4f}"),
        med("rps", "{:.0f}"),
        med("proxy_core_util", "{:.0%}"),
        med("ttft_p50_ms", "{:.1f}"),
        f"{sum(m.get('errors', [])):.0f}",
    ]
    return f"| {name} | {' | '.join(cells)} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated subset of the proxies")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    settings = Settings(repeats=args.repeats)
    cores = Cores.plan()
    os.sched_setaffinity(0, cores.loadgen)
    raise_priority()
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-floor-"))
    managed: list[Managed] = []
    try:
        upstream, upstream_port = fronts.start_upstream(workdir, cores)
        managed.append(upstream)
        up_pids = upstream.pids()
        targets: list[Target] = []
        gateway_port = procs.free_port()
        fleet_file = fronts.write_fleet_file(workdir, gateway_port, upstream_port)
        nginx, nginx_port = fronts.start_nginx(workdir, fleet_file, cores)
        managed.append(nginx)
        targets.append(Target("nginx", nginx_port, "/bench", nginx.pids, up_pids))
        for kind in KINDS:
            port = procs.free_port()
            argv = [*procs.python_module("bench.floor_servers", kind), str(port)]
            server = Managed(kind, [*argv, str(upstream_port)], cores.proxy, workdir / kind)
            managed.append(server)
            server.wait_port(port)
            targets.append(Target(kind, port, "", server.pids, up_pids))
        gateway = fronts.start_gateway(workdir, fleet_file, gateway_port, cores)
        managed.append(gateway)
        targets.append(Target("gateway", gateway_port, "/bench", gateway.pids, up_pids))
        targets = [t for t in targets if not only or t.name in only]
        found = run_loop(measure(targets, settings))
    finally:
        for proc in reversed(managed):
            proc.stop()
    head = (
        "| proxy | CPU s / 1,000 requests (c) | CPU s / 1,000 tokens (b) | requests/s (c) "
        "| proxy core busy (c) | TTFT p50 ms (b) | errors (b + c) |"
    )
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|")
    for target in targets:
        print(row(target.name, found[target.name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
