"""`python -m chaos`: the gateway and `fleet up` under faults, with figures.

    python -m chaos [--only a,b,c,d] [--quick] [--seed N] [--out FILE]

(a) 200 streams across two engines of one deployment, one engine SIGKILLed mid-stream;
(b) `fleet up` SIGTERMed at 50 random moments (engines loading, serving, restarting);
(c) 1,000 slowloris clients beside 32 normal ones; (d) 5,000 slow streams at once.
Engines are the fake `vllm serve` ((a), (b): supervised by `fleet up`) or the bench's
lean upstream ((c), (d)). Prints the figures, writes them to chaos/results/latest.md
(or --out), and exits 1 when an invariant did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.run import raise_file_limit
from chaos import scenarios
from chaos.scenarios import Figures, Settings

OUT = Path(__file__).parent / "results" / "latest.md"
NAMES = {
    "a": "SIGKILL an engine mid-stream",
    "b": "SIGTERM `fleet up` at random moments",
    "c": "slowloris beside normal clients",
    "d": "thousands of slow streams",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    parser.add_argument("--only", default="a,b,c,d", help="scenarios, e.g. a,c")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts (a smoke test): invariants checked, timing goals only reported",
    )
    parser.add_argument("--seed", type=int, default=None, help="(b)'s random moments")
    parser.add_argument("--out", type=Path, default=None, help=f"default {OUT}")
    args = parser.parse_args(argv)
    chosen = [name for name in args.only.split(",") if name]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(NAMES)}")
    settings = Settings.quick() if args.quick else Settings()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    out = args.out or (OUT if not args.quick else None)
    raise_file_limit()
    workdir = Path(tempfile.mkdtemp(prefix="fleet-chaos-"))
    runs: dict[str, Callable[[], Awaitable[tuple[Figures, list[str]]]]] = {
        "a": lambda: scenarios.kill_mid_stream(workdir, settings),
        "b": lambda: scenarios.sigterm_moments(workdir, settings, seed),
        "c": lambda: scenarios.slowloris(workdir, settings),
        "d": lambda: scenarios.slow_streams(workdir, settings),
    }
    lines = [
        "# Chaos: the gateway and `fleet up` under faults",
        "",
        f"`python -m chaos{' --quick' if args.quick else ''} --only {','.join(chosen)} "
        f"--seed {seed}` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    failures = 0
    started = time.monotonic()
    try:
        for name in chosen:
            print(f"chaos ({name}) {NAMES[name]} ...", flush=True)
            began = time.monotonic()
            try:
                figures, broken = asyncio.run(runs[name]())
            except Exception as exc:  # a scenario that could not run is a failure too
                figures, broken = {}, [f"the scenario did not run: {type(exc).__name__}: {exc}"]
            figures["seconds"] = round(time.monotonic() - began, 1)
            failures += bool(broken)
            verdict = "every invariant held" if not broken else "BROKEN: " + "; ".join(broken)
            block = ["", f"## ({name}) {NAMES[name]}: {verdict}", "", "| | |", "|---|---:|"]
            block += [f"| {key} | {value} |" for key, value in figures.items()]
            print("\n".join(block), flush=True)
            lines += block
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines += ["", f"Total: {time.monotonic() - started:.0f} s."]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"\nwritten to {out}")
    return 1 if failures else 0
