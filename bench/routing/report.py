"""Figures per setup and workload, the issue's goals checked, and the markdown table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.routing.client import Sample
from bench.routing.workload import Conversation

# Issue 16's goals (for the benchmark, not timed tests), as TTFT p50 ratios.
GOALS = (
    ("multi-turn", "fleet prefix", "fleet least_outstanding", 0.7),
    ("multi-turn", "fleet prefix", "vllm-router cache_aware", 1.0),
    ("interleaved", "fleet prefix", "fleet least_outstanding", 0.7),
    ("interleaved", "fleet prefix", "vllm-router cache_aware", 1.0),
    ("control", "fleet prefix", "fleet least_outstanding", 1.1),
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Row:
    setup: str
    workload: str
    requests: int
    errors: int
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    throughput: float  # requests per second
    hit_rate: float  # the engines' prefix-cache hits / queries, in tokens
    split: tuple[float, ...]  # each engine's share of the prompt tokens
    kept: float | None  # conversations answered by one replica throughout (fleet only)
    first_error: str | None = None
    decisions: dict[str, int] | None = None  # the prefix policy's, from /fleet/status


def row(
    setup: str,
    workload: str,
    samples: list[Sample],
    wall: float,
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    convs: list[Conversation] | None = None,
) -> Row:
    ok = [s for s in samples if s.ok]
    queries = [a["queries"] - b["queries"] for a, b in zip(after, before, strict=True)]
    hits = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    total = sum(queries)
    kept = None
    if convs and all(r != "?" for c in convs for r in c.replicas):
        kept = statistics.fmean(len(set(c.replicas)) == 1 for c in convs)
    errors = [s for s in samples if not s.ok]
    return Row(
        setup=setup,
        workload=workload,
        requests=len(samples),
        errors=len(errors),
        ttft_p50=percentile([s.ttft for s in ok], 50),
        ttft_p99=percentile([s.ttft for s in ok], 99),
        latency_p50=percentile([s.latency for s in ok], 50),
        latency_p99=percentile([s.latency for s in ok], 99),
        throughput=len(ok) / wall if wall > 0 else 0.0,
        hit_rate=hits / total if total else float("nan"),
        split=tuple(q / total for q in queries) if total else (),
        kept=kept,
        first_error=errors[0].error if errors else None,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | setup | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms "
        "| req/s | prefix-cache hits | split of prompt tokens | conversations on one replica "
        "| errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for r in rows:
        split = " / ".join(f"{s:.0%}" for s in r.split) or "-"
        kept = f"{r.kept:.0%}" if r.kept is not None else "-"
        lines.append(
            f"| {r.workload} | {r.setup} | {_ms(r.ttft_p50)} | {_ms(r.ttft_p99)} "
            f"| {_ms(r.latency_p50)} | {_ms(r.latency_p99)} | {r.throughput:.2f} "
            f"| {r.hit_rate:.1%} | {split} | {kept} | {r.errors} |"
        )
    return lines


def decisions(rows: list[Row]) -> list[str]:
    """What the prefix policy decided, per workload (its counters in `fleet status`)."""
    lines = []
    for r in rows:
        if r.decisions is not None:
            d = r.decisions
            lines.append(
                f"- {r.workload}: {d['hits']} to the replica holding the prefix, "
                f"{d['spills']} elsewhere (that one over the load bound), "
                f"{d['misses']} with no prefix seen before"
            )
    return lines


def goals(rows: list[Row]) -> list[str]:
    """A line per goal: the ratio of TTFT p50s, and met or missed by how much."""
    by = {(r.workload, r.setup): r for r in rows}
    lines = []
    for workload, mine, theirs, limit in GOALS:
        a, b = by.get((workload, mine)), by.get((workload, theirs))
        if a is None or b is None:
            lines.append(f"- {workload}: {mine} vs {theirs}: not run")
            continue
        ratio = a.ttft_p50 / b.ttft_p50 if b.ttft_p50 > 0 else float("nan")
        verdict = "met" if ratio <= limit else f"MISSED by {ratio / limit - 1:.0%}"
        lines.append(
            f"- {workload}: {mine} TTFT p50 {_ms(a.ttft_p50)} ms = {ratio:.2f}× {theirs}'s "
            f"{_ms(b.ttft_p50)} ms (goal ≤ {limit:g}×): {verdict}"
        )
    return lines
