"""The chaos scenarios. Each returns (figures, broken): what it measured, and the
invariants that did not hold (empty when all did).

(a) kill: streams across two engines of one deployment, one engine SIGKILLed mid-stream.
(b) sigterm: `fleet up` sent SIGTERM at random moments (loading, serving, restarting).
(c) slowloris: slow clients trickling headers beside normal clients.
(d) slow streams: thousands of slow streams at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fronts, procs
from bench.loadgen import Client, connect
from bench.procs import Cores, Managed
from bench.scenarios import Settings as BenchSettings
from bench.scenarios import Target, chat_body, failed, idle_streams, payload, percentile
from chaos.fleet import Fleet, leftovers, new_marker, sweep, write_fleet_file
from chaos.streams import StreamOutcome, chat_request, stream

Figures = dict[str, Any]
PATH = "/chat/v1/chat/completions"


@dataclass(frozen=True)
class Settings:
    kill_streams: int = 200
    kill_tokens: int = 150
    kill_token_delay: float = 0.02  # 150 tokens: 3 s a stream
    kill_after: float = 1.0
    kill_new_requests: int = 50
    sigterm_rounds: int = 50
    sigterm_streams: int = 10
    slow_clients: int = 1000
    normal_clients: int = 32
    normal_seconds: float = 4.0
    slow_streams: int = 5000
    slow_stream_tokens: int = 8
    slow_stream_delay: float = 1.0
    timing_goals: bool = True  # False in --quick: timings are reported, never judged

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            kill_streams=20,
            kill_new_requests=10,
            sigterm_rounds=3,
            sigterm_streams=3,
            slow_clients=50,
            normal_clients=4,
            normal_seconds=1.0,
            slow_streams=200,
            slow_stream_tokens=3,
            slow_stream_delay=0.5,
            timing_goals=False,
        )


def _killpg(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)  # engines lead their own process group


# ---------------------------------------------------------------- (a) kill mid-stream


async def _plain(port: int) -> StreamOutcome:
    """A small non-streamed request (read with the same strict parser)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(chat_request(PATH, 4, stream=False))
        raw = await asyncio.wait_for(reader.read(-1), 30)
    finally:
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    outcome = StreamOutcome(status=int(head[0].split()[1]) if head[0] else 0)
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "x-fake-engine":
            outcome.engine = value.strip()
    return outcome


async def kill_mid_stream(workdir: Path, s: Settings) -> tuple[Figures, list[str]]:
    marker = new_marker("kill")
    path = write_fleet_file(workdir, marker, 2, ["--token-delay", str(s.kill_token_delay)])
    fleet = Fleet(path)
    broken: list[str] = []
    try:
        ups = {u["name"]: u for u in await asyncio.to_thread(fleet.wait_ready, 2)}
        victim, survivor = ups["chat-0"], ups["chat-1"]
        tasks = [
            asyncio.ensure_future(stream(fleet.port, PATH, s.kill_tokens))
            for _ in range(s.kill_streams)
        ]
        await asyncio.sleep(s.kill_after)
        _killpg(victim["pid"])
        killed_at = time.monotonic()
        # New requests right after the kill: every one must be answered, by the survivor.
        new: list[StreamOutcome] = []
        for start in range(0, s.kill_new_requests, 10):
            count = min(10, s.kill_new_requests - start)
            new += await asyncio.gather(*(_plain(fleet.port) for _ in range(count)))
        results = await asyncio.gather(*tasks)

        def back() -> bool:
            now = {u["name"]: u for u in fleet.upstreams()}.get("chat-0")
            return bool(now and now["state"] == "ready" and now["pid"] != victim["pid"])

        await asyncio.to_thread(fleet._wait, back, 60.0, "chat-0 back")
        back_s = time.monotonic() - killed_at
    finally:
        rc = fleet.terminate() if fleet.proc.poll() is None else fleet.proc.returncode
        sweep(marker)
    # The fake engine's X-Fake-Engine ends in its socket's name (`chat-0`), or its port.
    victim_port, survivor_port = _where(victim), _where(survivor)
    on_victim = [r for r in results if r.engine.endswith(":" + victim_port)]
    on_survivor = [r for r in results if r.engine.endswith(":" + survivor_port)]
    elsewhere = len(results) - len(on_victim) - len(on_survivor)
    victim_ok = sum(r.ended_with_error_event or r.intact for r in on_victim)
    cut = sum(r.ended_with_error_event for r in on_victim)
    survivor_ok = sum(r.intact and r.tokens == s.kill_tokens for r in on_survivor)
    new_ok = sum(r.status == 200 and r.engine.endswith(":" + survivor_port) for r in new)
    figures: Figures = {
        "streams": len(results),
        "on the killed engine": len(on_victim),
        "  ended with an error event and [DONE]": cut,
        "  finished before the kill": victim_ok - cut,
        "on the survivor": len(on_survivor),
        "  intact (every token, [DONE])": survivor_ok,
        "not answered by an engine": elsewhere,
        "new requests right after the kill": len(new),
        "  answered 200 by the survivor": new_ok,
        "killed engine ready again after (s)": round(back_s, 2),
        "fleet up exit status": rc,
    }
    if victim_ok != len(on_victim):
        broken.append(f"{len(on_victim) - victim_ok} streams on the killed engine ended badly")
    if not cut:
        broken.append("no stream was cut by the kill (the kill came too late to test it)")
    if survivor_ok != len(on_survivor):
        broken.append(f"{len(on_survivor) - survivor_ok} streams on the survivor not intact")
    if elsewhere:
        broken.append(f"{elsewhere} streams were not answered by an engine")
    if new_ok != len(new):
        broken.append(f"{len(new) - new_ok} new requests after the kill failed")
    if rc != 0:
        broken.append(f"fleet up exited {rc}")
    return figures, broken


# ---------------------------------------------------------------- (b) SIGTERM anywhere

PHASES = ("loading", "serving", "restarting")


async def _sigterm_round(
    workdir: Path, index: int, phase: str, rng: random.Random, s: Settings
) -> tuple[float, list[str]]:
    """One `fleet up`, SIGTERMed in `phase`: seconds to exit, and what went wrong."""
    marker = new_marker(f"term{index}")
    delay = f"{rng.uniform(0.3, 1.5):.2f}"
    args = ["--startup-delay", delay, "--token-delay", "0.02"]
    fleet = Fleet(write_fleet_file(workdir, marker, 2, args))
    problems: list[str] = []
    streams: list[asyncio.Future[StreamOutcome]] = []
    try:
        await asyncio.to_thread(fleet.wait_listening)
        if phase == "loading":
            await asyncio.sleep(rng.uniform(0.0, 0.25))
        else:
            ups = await asyncio.to_thread(fleet.wait_ready, 2)
            if phase == "serving":  # 50 tokens at 0.02 s: each stream lasts about 1 s
                streams = [
                    asyncio.ensure_future(stream(fleet.port, PATH, 50))
                    for _ in range(s.sigterm_streams)
                ]
                await asyncio.sleep(rng.uniform(0.1, 0.6))
            else:
                _killpg(ups[0]["pid"])
                await asyncio.sleep(rng.uniform(0.0, 0.4))
        signalled = time.monotonic()
        rc = await asyncio.to_thread(fleet.terminate)
        took = time.monotonic() - signalled
        left = leftovers(marker)
        if rc != 0:
            problems.append(f"round {index} ({phase}): fleet up exited {rc}")
        if left:
            problems.append(f"round {index} ({phase}): processes left behind: {left}")
        for outcome in await asyncio.gather(*streams):
            if not (outcome.intact and outcome.tokens == 50):
                problems.append(f"round {index} ({phase}): a stream in flight did not finish")
                break
        return took, problems
    finally:
        if fleet.proc.poll() is None:
            fleet.kill()
        sweep(marker)


async def sigterm_moments(workdir: Path, s: Settings, seed: int) -> tuple[Figures, list[str]]:
    rng = random.Random(seed)
    took: dict[str, list[float]] = {phase: [] for phase in PHASES}
    broken: list[str] = []
    for index in range(s.sigterm_rounds):
        phase = PHASES[index % len(PHASES)] if index < len(PHASES) else rng.choice(PHASES)
        seconds, problems = await _sigterm_round(workdir, index, phase, rng, s)
        took[phase].append(seconds)
        broken += problems
    figures: Figures = {"rounds": s.sigterm_rounds, "seed": seed}
    for phase in PHASES:
        figures[f"SIGTERM while {phase}"] = len(took[phase])
        if took[phase]:
            figures[f"  {phase}: slowest exit after SIGTERM (s)"] = round(max(took[phase]), 2)
    figures["rounds with a process left behind or a bad exit"] = len(
        {p.split(":")[0] for p in broken}
    )
    return figures, broken


# ---------------------------------------------------------------- (c) and (d): gateway only


class Front:
    """The bench's lean upstream and `fleet up` in front of it (no engine to supervise)."""

    def __init__(self, workdir: Path) -> None:
        self.cores = Cores.plan()
        self.managed: list[Managed] = []
        upstream, self.upstream_port = fronts.start_upstream(workdir, self.cores)
        self.managed.append(upstream)
        self.port = procs.free_port()
        fleet_file = fronts.write_fleet_file(workdir, self.port, self.upstream_port)
        self.gateway = fronts.start_gateway(workdir, fleet_file, self.port, self.cores)
        self.managed.append(self.gateway)
        self.target = Target(
            "gateway", self.port, f"/{fronts.DEPLOYMENT}", self.gateway.pids, upstream.pids()
        )

    def stop(self) -> None:
        for proc in reversed(self.managed):
            proc.stop()


async def _normal_load(target: Target, clients: int, seconds: float) -> tuple[list[float], int]:
    """`clients` keep-alive clients in a closed loop: latencies, failures."""
    request = payload(target, chat_body(16, stream=False))
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal failures
        client: Client = await connect("127.0.0.1", target.port)
        while time.perf_counter() < deadline:
            if not client.usable:
                client.close()
                client = await connect("127.0.0.1", target.port)
            result = await client.request(request, 30.0)
            if failed(result):
                failures += 1
            else:
                latencies.append(result.t_end - result.t_send)
        client.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies, failures


async def _trickle(port: int, stop: asyncio.Event, closed: list[int]) -> None:
    """A slowloris client: a request head sent one byte a second, never finished."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(1)
        return
    head = b"POST /bench/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    try:
        for byte in head:
            if stop.is_set():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1), 1.0)  # anything back: it was refused
                closed.append(1)
                return
            except TimeoutError:
                pass
    except OSError:
        closed.append(1)
    finally:
        writer.close()


async def slowloris(workdir: Path, s: Settings) -> tuple[Figures, list[str]]:
    front = Front(workdir)
    try:
        base1, fail1 = await _normal_load(front.target, s.normal_clients, s.normal_seconds)
        stop = asyncio.Event()
        closed: list[int] = []
        slow = [
            asyncio.ensure_future(_trickle(front.port, stop, closed)) for _ in range(s.slow_clients)
        ]
        await asyncio.sleep(1.0)  # every slow client connected and trickling
        under, fail2 = await _normal_load(front.target, s.normal_clients, s.normal_seconds)
        stop.set()
        await asyncio.gather(*slow)
        base2, fail3 = await _normal_load(front.target, s.normal_clients, s.normal_seconds)
    finally:
        front.stop()
    base_p99 = (percentile(base1, 99) + percentile(base2, 99)) / 2
    under_p99 = percentile(under, 99)
    ratio = under_p99 / base_p99
    figures: Figures = {
        "slow clients": s.slow_clients,
        "  cut off by the gateway": len(closed),
        "normal clients": s.normal_clients,
        "normal p99 without slow clients (ms, before/after)": (
            f"{percentile(base1, 99) * 1e3:.2f} / {percentile(base2, 99) * 1e3:.2f}"
        ),
        "normal p99 with slow clients (ms)": round(under_p99 * 1e3, 2),
        "p99 ratio (goal <= 2)": round(ratio, 2)
        if s.timing_goals
        else f"{ratio:.2f} (not judged in --quick: too few requests for a p99)",
        "normal requests": len(base1) + len(under) + len(base2),
        "normal requests failed": fail1 + fail2 + fail3,
    }
    broken = []
    if fail1 + fail2 + fail3:
        broken.append(f"{fail1 + fail2 + fail3} normal requests failed")
    if s.timing_goals and ratio > 2:
        broken.append(f"normal clients' p99 {ratio:.2f}x with slow clients (goal <= 2x)")
    return figures, broken


async def slow_streams(workdir: Path, s: Settings) -> tuple[Figures, list[str]]:
    front = Front(workdir)

    async def upstream_stats(reset: bool) -> dict[str, int]:
        path = "/bench/stats" + ("?reset=1" if reset else "")
        reader, writer = await asyncio.open_connection("127.0.0.1", front.upstream_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read(-1)
        writer.close()
        data = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        return {k: int(v) for k, v in data.items()}

    settings = BenchSettings(
        idle_streams=s.slow_streams,
        idle_tokens=s.slow_stream_tokens,
        idle_delay=s.slow_stream_delay,
        timeout=120.0,
    )
    try:
        out = await idle_streams(front.target, settings, upstream_stats)
    finally:
        front.stop()
    figures: Figures = {
        "streams at once": int(out["streams"]),
        "tokens each, seconds apart": f"{s.slow_stream_tokens}, {s.slow_stream_delay:g}",
        "peak concurrent at the engine": int(out["peak_concurrent"]),
        "errors": int(out["errors"]),
        "gateway RSS idle (MB)": round(out["rss_idle_mb"], 1),
        "gateway RSS peak (MB)": round(out["rss_peak_mb"], 1),
    }
    broken = [f"{int(out['errors'])} of the slow streams failed"] if out["errors"] else []
    return figures, broken


def _where(upstream: dict[str, Any]) -> str:
    """How the fake engine names itself: its socket's file name without `.sock`, or its port."""
    sock = upstream.get("socket")
    return Path(sock).name.removesuffix(".sock") if sock else str(upstream["port"])
