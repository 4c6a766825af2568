"""`python -m tests.fuzz [--count N] [--seed S]`: a fuzz campaign against `fleet up`.

Prints the figures (cases, requests, statuses, time, the gateway's RSS, findings) and
exits 1 when an invariant is broken (hypothesis prints the shrunk case first).
"""

from __future__ import annotations

import argparse
import random
import sys

from tests.fuzz.campaign import BATCH, Campaign, Figures, GatewayDown
from tests.fuzz.oracle import Broken


def report(figures: Figures, seed: int, count: int) -> str:
    rss = [r // 1024 for r in figures.rss_kib] or [0]
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(figures.statuses.items()))
    fates = ", ".join(f"{f}: {n}" for f, n in sorted(figures.fates.items()))
    rate = figures.cases / figures.seconds if figures.seconds else 0.0
    lines = [
        f"fuzz campaign: seed {seed}, {count} cases asked (batches of {BATCH}, hypothesis seed "
        f"{seed}+batch)",
        f"  cases run      {figures.cases} ({rate:.0f}/s, {figures.seconds:.0f} s, shrinking "
        "included)",
        f"  requests sent  {figures.requests} ({fates})",
        f"  answers read   {figures.answers}; engine received {figures.engine_requests}",
        f"  statuses       {len(figures.statuses)} distinct: {statuses}",
        f"  connections    {figures.early_closes} closed early by the client, "
        f"{figures.timeouts} waited out ({IDLE_S} s), {figures.resets} reset",
        f"  plain checks   {figures.plain_checks} valid requests answered by the engine",
        f"  gateway RSS    start {rss[0]} MiB, peak {max(rss)} MiB, end {rss[-1]} MiB "
        f"({len(rss)} samples)",
        f"  findings       {len(figures.findings)}",
    ]
    lines += [f"    - {f[:1500]}" for f in figures.findings[:20]]
    return "\n".join(lines)


IDLE_S = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--count", type=int, default=100_000, help="cases to run")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (random)")
    parser.add_argument("--batch", type=int, default=BATCH, help="cases per hypothesis run")
    parser.add_argument("--notes", action="store_true", help="print how often each form ran")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"fuzz: seed {seed} (rerun: make fuzz FUZZ_SEED={seed} FUZZ_COUNT={args.count})")
    status = 0
    with Campaign() as campaign:
        try:
            campaign.run(
                args.count, seed, args.batch, progress=lambda line: print(line, flush=True)
            )
        except (Broken, GatewayDown) as exc:
            # Hypothesis adds the shrunk case to the exception as a note.
            notes = "\n".join(getattr(exc, "__notes__", []))
            print(f"FAILED: {exc}\n{notes}")
            campaign.figures.findings.insert(0, str(exc))
            status = 1
        figures = campaign.figures
        if not figures.seconds:
            import time

            figures.seconds = time.monotonic() - figures.started
        if figures.findings:
            status = 1
        print(report(figures, seed, args.count))
        if args.notes:
            for note, n in figures.notes.most_common():
                print(f"    {n:8d}  {note}")
            if figures.timed_out_notes:
                print("  waited out, by form:", dict(figures.timed_out_notes.most_common(15)))
    return status


if __name__ == "__main__":
    sys.exit(main())
