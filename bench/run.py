"""`python -m bench [--quick]`: the whole benchmark in one run.

1. Pin this process (the load generator) and start the upstream on their cores.
2. Start nginx (the vhost `fleet nginx` renders) and the gateway (`fleet up`), each
   pinned to the proxy core. They sit idle while another front end is measured.
3. For each repetition, for each scenario, measure direct, nginx and the gateway in
   turn (the order rotates each repetition, so drift does not favour one of them).
4. Write bench/results/latest.md and latest.png; print the table.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import fronts, policy_cost, procs, report, scenarios
from bench.loadgen import connect
from bench.procs import Cores, Managed
from bench.scenarios import Settings, Target
from vllm_fleet.nginx_run import find_nginx

T = TypeVar("T")
RESULTS = Path(__file__).resolve().parent / "results"
Scenario = Callable[[Target, Settings], Awaitable[dict[str, float]]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def fetch_json(port: int, path: str) -> dict[str, Any]:
    client = await connect("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
    client.record_body = True
    result = await client.request(request, 10.0)
    client.close()
    if not result.ok:
        raise RuntimeError(f"GET {path} on port {port}: {result.error or result.status}")
    data: dict[str, Any] = json.loads(client.body)
    return data


async def smoke(target: Target) -> None:
    """One streamed and one plain request through `target`, or a clear failure."""
    client = await connect("127.0.0.1", target.port)
    for stream in (True, False):
        body = scenarios.chat_body(4, stream=stream)
        result = await client.request(scenarios.payload(target, body), 10.0)
        if scenarios.failed(result, 4 if stream else None):
            raise RuntimeError(
                f"{target.name}: a {'streamed' if stream else 'plain'} request failed "
                f"(status {result.status}, {result.error}, {result.tokens} tokens)"
            )
    client.close()


def _summary(scenario: str, front: str, m: dict[str, float]) -> str:
    keys = {
        "a": ("lat_p50_ms", "lat_p99_ms", "errors"),
        "b": ("ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "tokens_per_s", "errors"),
        "c": ("rps", "lat_p50_ms", "proxy_core_util", "load_core_util", "errors"),
        "d": ("rss_peak_mb", "peak_concurrent", "errors"),
    }[scenario]
    shown = " ".join(f"{k}={m[k]:.3g}" for k in keys if k in m)
    return f"  ({scenario}) {front:<8} {shown}"


async def measure(
    targets: list[Target], chosen: list[str], settings: Settings, upstream_port: int
) -> report.Runs:
    async def upstream_stats(reset: bool) -> dict[str, int]:
        data = await fetch_json(upstream_port, "/bench/stats" + ("?reset=1" if reset else ""))
        return {k: int(v) for k, v in data.items()}

    async def idle(target: Target, s: Settings) -> dict[str, float]:
        return await scenarios.idle_streams(target, s, upstream_stats)

    async def rps(target: Target, s: Settings) -> dict[str, float]:
        return await scenarios.requests_per_second(target, s, upstream_stats)

    plan: list[tuple[str, Scenario, int]] = [
        ("a", scenarios.single_client, settings.repeats),
        ("b", scenarios.streams, settings.stream_repeats),
        ("c", rps, settings.repeats),
        ("d", idle, settings.idle_repeats),
    ]
    plan = [p for p in plan if p[0] in chosen]
    for target in targets:
        await smoke(target)
    runs: report.Runs = {name: {t.name: [] for t in targets} for name, _, _ in plan}
    rounds = max(count for _, _, count in plan)
    for rep in range(rounds):
        order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
        log(f"repetition {rep + 1}/{rounds}")
        for name, scenario, count in plan:
            if rep >= count:
                continue
            for target in order:
                if target.name in report.EXTRA_FRONTS and name not in report.LOCAL_SCENARIOS:
                    continue
                metrics = await scenario(target, settings)
                runs[name][target.name].append(metrics)
                log(_summary(name, target.name, metrics))
                await asyncio.sleep(0.2)
    return runs


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{model}, {os.cpu_count()} CPUs, {mem_gb:.0f} GB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    import httptools

    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "no uvloop"
    done = subprocess.run(
        [find_nginx(), "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    nginx = done.stderr.strip().replace("nginx version: ", "")
    return f"{nginx}; gateway: the relay on httptools {httptools.__version__}, {loop}"


def describe(settings: Settings) -> dict[str, str]:
    s = settings
    return {
        "a": f"(a) 1 client, non-streaming ({s.single_tokens} tokens)",
        "b": f"(b) {s.streams} streams × {s.stream_tokens} tok",
        "c": f"(c) non-streaming, {s.rps_clients} clients",
        "d": f"(d) {s.idle_streams} slow streams",
    }


def settings_text(s: Settings) -> str:
    return (
        f"(a) one keep-alive client, sequential chat completions of {s.single_tokens} tokens "
        f"for {s.single_seconds:g} s. "
        f"(b) {s.streams} streams opened at once, {s.stream_tokens} tokens each, one token "
        f"every {s.stream_delay * 1000:g} ms per stream from the upstream "
        f"({s.streams / s.stream_delay:.0f} tokens/s offered); TTFT from sending the request "
        "to the first content token; gaps between consecutive tokens of a stream. "
        f"(c) {s.rps_clients} keep-alive clients in a closed loop for {s.rps_seconds:g} s "
        f"(after {s.rps_warmup:g} s warm-up). "
        f"(d) {s.idle_streams} streams held open at once, one token every {s.idle_delay:g} s, "
        f"{s.idle_tokens} tokens each; proxy RSS sampled every 50 ms. "
        f"Repetitions: {s.repeats} ((b): {s.stream_repeats}, (d): {s.idle_repeats}); "
        "cells show the median "
        "(min–max)."
    )


def write_results(
    out: Path,
    runs: report.Runs,
    settings: Settings,
    cores: Cores,
    hwm_mb: dict[str, float],
    elapsed: float,
    args: argparse.Namespace,
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    titles = describe(settings)
    table = report.table(runs, titles, hwm_mb)
    checks = report.targets(runs)
    command = "make bench" if argv_is_default(args) else "python -m bench " + " ".join(sys.argv[1:])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    drawn = report.chart(runs, out / "latest.png", f"{machine()}\n{cores.describe()}")
    lines = [
        "# Gateway overhead: direct vs nginx vs the fleet gateway",
        "",
        f"Run `{command}` on {when}, {elapsed:.0f} s in all.",
        "",
        f"- Machine: {machine()}",
        f"- Software: {versions()}",
        f"- Cores: {cores.describe()}; every benchmark process at nice "
        f"{os.getpriority(os.PRIO_PROCESS, 0)} (ahead of other work on the machine)",
        "- Upstream: `bench/upstream.py`, a raw asyncio vLLM look-alike (SSE in vLLM's "
        "format, chunked encoding, keep-alive). nginx: the vhost `fleet nginx` renders, one "
        "worker process, access log off. Gateway: `fleet up` on a fleet file whose deployment "
        "has `endpoints:` pointing at the upstream.",
        f"- Scenarios: {settings_text(settings)}",
        "",
        table,
        "",
        "## Targets (issue 5)",
        "",
        report.targets_table(checks),
        "",
        *[f"- {note}" for note in report.bottlenecks(runs)],
        "",
    ]
    if any(runs.get(s, {}).get(f) for s in report.LOCAL_SCENARIOS for f in report.LOCAL_FRONTS):
        lines += [
            "## The gateway to its engine: a Unix socket against TCP (issue 12)",
            "",
            "One more `fleet up` (on the proxy core too) starts the upstream as two local "
            "engines of its own, moved to the upstream's cores: `uds` on a Unix socket (the "
            "default) and `tcp` with `listen: tcp`; measured in turn with the others.",
            "",
            report.local_table(runs, titles),
            "",
        ]
    if any(runs.get(s, {}).get("gateway-keys") for s in report.LOCAL_SCENARIOS):
        lines += [
            "## Keys, limits and usage on every request (issue 12)",
            "",
            "One more `fleet up` (on the proxy core too) in front of the same upstream, its "
            "fleet file the same but for a key with rpm, tpm and max_concurrent limits the "
            "run never reaches; every request sends the key, is admitted against the three "
            "limits, gets the x-ratelimit-* headers and is settled with its usage. The "
            "plain `gateway` has no key; both keep the usage ledger (the default).",
            "",
            report.keys_table(runs, titles),
            "",
        ]
    log("bench: the routing policies' CPU per request, in process")
    lines += policy_cost.section(policy_cost.measure(200 if args.quick else 4000))
    if drawn:
        lines += ["![TTFT, tokens/s and requests/s per front end](latest.png)", ""]
    text = "\n".join(lines)
    (out / "latest.md").write_text(text, encoding="utf-8")
    (out / "latest.json").write_text(
        json.dumps({"runs": runs, "hwm_mb": hwm_mb, "settings": vars(settings)}, indent=1),
        encoding="utf-8",
    )
    return text


def argv_is_default(args: argparse.Namespace) -> bool:
    partial = args.quick or args.repeats or args.profile or args.fleet
    return not partial and args.scenarios == "a,b,c,d"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: small, < 60 s")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per scenario")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--fronts",
        default=",".join(report.FRONTS + report.EXTRA_FRONTS),
        help="a subset of direct,nginx,gateway,gateway-uds,gateway-tcp,gateway-keys, e.g. "
        "gateway (gateway-uds/-tcp: the gateway to an engine it started, over a Unix socket "
        "/ TCP; gateway-keys: with a key and limits on every request; scenarios b and c "
        "only)",
    )
    parser.add_argument("--scenarios", default="a,b,c,d", help="e.g. b,c")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the gateway with py-spy while the scenarios run (an .svg flame graph, "
        "or raw collapsed stacks for a .txt name)",
    )
    parser.add_argument(
        "--fleet",
        default=None,
        help="the command that runs `fleet` for the gateway (default: this environment's), "
        "e.g. to measure a patched gateway: --fleet 'python my_fleet.py'",
    )
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.repeats:
        counts = {
            "repeats": args.repeats,
            "stream_repeats": args.repeats,
            "idle_repeats": min(settings.idle_repeats, args.repeats),
        }
        settings = Settings(**{**vars(settings), **counts})
    names = [n for n in args.fronts.split(",") if n]
    chosen = [n for n in args.scenarios.split(",") if n]
    every = report.FRONTS + report.EXTRA_FRONTS
    if not set(names) <= set(every) or not set(chosen) <= set("abcd"):
        parser.error(f"--fronts is a subset of {','.join(every)}; --scenarios of a,b,c,d")
    full = set(report.FRONTS) <= set(names) and set(chosen) == set("abcd")
    full = full and not (args.fleet or args.profile)
    out = args.out or (RESULTS if full else Path(tempfile.mkdtemp(prefix="fleet-bench-out-")))

    started = time.monotonic()
    cores = Cores.plan()
    os.sched_setaffinity(0, cores.loadgen)
    niceness = raise_priority()
    files = raise_file_limit()
    if files < 3 * settings.idle_streams:
        log(f"bench: only {files} open files allowed; (d) may fail (raise `ulimit -n`)")
    log(f"bench: {machine()}; {cores.describe()}; nice {niceness}")
    managed: list[Managed] = []
    workdir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    profiler: subprocess.Popen[bytes] | None = None
    try:
        upstream, upstream_port = fronts.start_upstream(workdir, cores)
        managed.append(upstream)
        up_pids = upstream.pids()
        targets = [Target("direct", upstream_port, "", list, up_pids)]
        gateway_port = procs.free_port()
        fleet_file = fronts.write_fleet_file(workdir, gateway_port, upstream_port)
        if "nginx" in names:
            nginx, nginx_port = fronts.start_nginx(workdir, fleet_file, cores)
            managed.append(nginx)
            prefix = f"/{fronts.DEPLOYMENT}"
            targets.append(Target("nginx", nginx_port, prefix, nginx.pids, up_pids))
        if "gateway" in names:
            fleet = shlex.split(args.fleet) if args.fleet else None
            gateway = fronts.start_gateway(workdir, fleet_file, gateway_port, cores, fleet)
            managed.append(gateway)
            prefix = f"/{fronts.DEPLOYMENT}"
            targets.append(Target("gateway", gateway_port, prefix, gateway.pids, up_pids))
            if args.profile is not None:
                profiler = start_profiler(gateway.pid, args.profile, workdir)
        if "gateway-keys" in names:
            keys_port = procs.free_port()
            keys_file = fronts.write_fleet_file(workdir, keys_port, upstream_port, keys=True)
            fleet = shlex.split(args.fleet) if args.fleet else None
            keyed = fronts.start_gateway(workdir, keys_file, keys_port, cores, fleet)
            keyed.name = "gateway-keys"
            managed.append(keyed)
            key_line = b"authorization: Bearer %s\r\n" % fronts.BENCH_KEY.encode()
            prefix = f"/{fronts.DEPLOYMENT}"
            targets.append(Target("gateway-keys", keys_port, prefix, keyed.pids, up_pids, key_line))
        local = [n for n in report.LOCAL_FRONTS if n in names]
        if local:
            local_port = procs.free_port()
            local_file = fronts.write_local_fleet_file(workdir, local_port, cores)
            fleet = shlex.split(args.fleet) if args.fleet else None
            local_gw = fronts.start_gateway(workdir, local_file, local_port, cores, fleet)
            local_gw.name = "gateway-local"
            managed.append(local_gw)
            engine_pids = fronts.local_engine_pids(local_port)
            for name in local:
                dep = fronts.LOCAL[name]
                targets.append(
                    Target(name, local_port, f"/{dep}", local_gw.pids, [engine_pids[dep]])
                )
        targets = [t for t in targets if t.name in names]
        log(f"bench: {', '.join(f'{t.name} :{t.port}' for t in targets)}; work dir {workdir}")
        runs = run_loop(measure(targets, chosen, settings, upstream_port))
        hwm_mb = {m.name: procs.hwm_bytes(m.pids()) / 2**20 for m in managed if m.name in names}
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        for proc in reversed(managed):
            proc.stop()
    text = write_results(out, runs, settings, cores, hwm_mb, time.monotonic() - started, args)
    print(text)
    errors = report.error_count(runs)
    log(f"bench: results in {out / 'latest.md'}; errors per front end: {errors}")
    return 0


def raise_file_limit() -> int:
    """(d) holds thousands of connections in each process: lift the soft limit on open
    files to the hard one (every process started from here inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def raise_priority(niceness: int = -10) -> int:
    """Run the load generator, upstream and proxies (they inherit it) ahead of other work
    on a shared machine, where permitted; the same for every front end. With autogroup
    scheduling a nice value only counts inside its session's group, so the group's nice
    is raised too. Returns the nice value in effect."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    group = Path("/proc/self/autogroup")
    with contextlib.suppress(OSError, ValueError, IndexError):
        before = group.read_text().split("nice")[1].strip()
        group.write_text(str(niceness))
        # The group is the whole terminal session's: give it back its nice at exit.
        atexit.register(lambda: group.write_text(before))
    return os.getpriority(os.PRIO_PROCESS, 0)


def start_profiler(pid: int, path: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """py-spy record on the gateway until stopped (SIGINT makes it write the file)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    kind = "raw" if path.suffix == ".txt" else "flamegraph"
    argv = [str(spy), "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
    argv += ["--format", kind, "-o", str(path.resolve())]
    with (workdir / "py-spy.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_loop(main: Awaitable[T]) -> T:
    """Run `main` on uvloop (asyncio's own loop without it)."""

    async def wrapper() -> T:
        return await main

    try:
        import uvloop
    except ImportError:
        return asyncio.run(wrapper())
    return uvloop.run(wrapper())
