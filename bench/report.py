"""Turning repeated measurements into the results table, the target check and the chart.

Every number in the table is the median over the repetitions of that scenario, with the
spread (min to max) next to it; the ratios compare medians from the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

FRONTS = ("direct", "nginx", "gateway")
# The gateway to engines it started itself: over a Unix socket and over TCP (bench/fronts.py).
LOCAL_FRONTS = ("gateway-uds", "gateway-tcp")
# The gateway (same upstream as `gateway`) with a key on every request, limits and usage on.
KEY_FRONTS = ("gateway-keys",)
LOCAL_SCENARIOS = ("b", "c")  # the scenarios LOCAL_FRONTS and KEY_FRONTS are measured in
EXTRA_FRONTS = LOCAL_FRONTS + KEY_FRONTS
# scenario -> front -> one metrics dict per repetition
Runs = dict[str, dict[str, list[dict[str, float]]]]


@dataclass(frozen=True)
class Row:
    scenario: str
    label: str
    metric: str
    fmt: str = "{:.2f}"
    proxy_only: bool = False  # meaningless for a direct connection
    total: bool = False  # sum over repetitions (errors) instead of the median


ROWS = (
    Row("a", "latency p50 (ms)", "lat_p50_ms", "{:.3f}"),
    Row("a", "latency p99 (ms)", "lat_p99_ms", "{:.3f}"),
    Row("a", "errors (all runs)", "errors", "{:.0f}", total=True),
    Row("b", "TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}"),
    Row("b", "TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}"),
    Row("b", "inter-token gap p99 (ms)", "gap_p99_ms", "{:.1f}"),
    Row("b", "tokens/s delivered", "tokens_per_s", "{:.0f}"),
    Row("b", "errors (all runs)", "errors", "{:.0f}", total=True),
    Row(
        "b", "proxy CPU s per 1,000 tokens", "proxy_cpu_per_1k_tokens_s", "{:.4f}", proxy_only=True
    ),
    Row("b", "proxy core busy (%)", "proxy_core_util", "{:.0%}", proxy_only=True),
    Row("c", "requests/s", "rps", "{:.0f}"),
    Row("c", "latency p50 (ms)", "lat_p50_ms", "{:.2f}"),
    Row("c", "errors (all runs)", "errors", "{:.0f}", total=True),
    Row("c", "proxy CPU s per 1,000 requests", "proxy_cpu_per_1k_req_s", "{:.3f}", proxy_only=True),
    Row("c", "proxy core busy (%)", "proxy_core_util", "{:.0%}", proxy_only=True),
    Row("c", "load generator + upstream CPU (% of a core)", "load_core_util", "{:.0%}"),
    Row("c", "new connections to the engine (keep-alive misses)", "upstream_connections", "{:.0f}"),
    Row("d", "proxy peak RSS (MB)", "rss_peak_mb", "{:.1f}", proxy_only=True),
    Row("d", "proxy RSS before (MB)", "rss_idle_mb", "{:.1f}", proxy_only=True),
    Row("d", "streams open at once (upstream's count)", "peak_concurrent", "{:.0f}"),
    Row("d", "errors (all runs)", "errors", "{:.0f}", total=True),
    Row("b", "other processes' CPU, noise (% of a core)", "background_util", "{:.0%}"),
    Row("c", "other processes' CPU, noise (% of a core)", "background_util", "{:.0%}"),
)


LOCAL_ROWS = (
    Row("b", "TTFT p50 (ms)", "ttft_p50_ms", "{:.1f}"),
    Row("b", "TTFT p99 (ms)", "ttft_p99_ms", "{:.1f}"),
    Row("b", "gateway CPU s per 1,000 tokens", "proxy_cpu_per_1k_tokens_s", "{:.4f}"),
    Row("c", "requests/s", "rps", "{:.0f}"),
    Row("c", "latency p50 (ms)", "lat_p50_ms", "{:.2f}"),
    Row("c", "gateway CPU s per 1,000 requests", "proxy_cpu_per_1k_req_s", "{:.3f}"),
    Row("b", "errors (all runs)", "errors", "{:.0f}", total=True),
    Row("c", "errors (all runs)", "errors", "{:.0f}", total=True),
)


def local_table(runs: Runs, titles: dict[str, str]) -> str:
    """The gateway to its own engine over a Unix socket against over TCP, same run."""
    return pair_table(
        runs,
        titles,
        ("gateway-tcp", "over TCP"),
        ("gateway-uds", "over a Unix socket"),
        "socket÷TCP",
    )


def keys_table(runs: Runs, titles: dict[str, str]) -> str:
    """The gateway with a key, limits and usage on every request, against without."""
    return pair_table(
        runs, titles, ("gateway", "no key"), ("gateway-keys", "key + limits"), "keys÷none"
    )


def pair_table(
    runs: Runs,
    titles: dict[str, str],
    base: tuple[str, str],
    other: tuple[str, str],
    ratio_name: str,
) -> str:
    """Two gateway fronts side by side on LOCAL_ROWS, and other÷base."""
    head = f"| scenario | metric | {base[1]} | {other[1]} | {ratio_name} |"
    lines = [head, "|---|---|---:|---:|---:|"]
    for row in sorted(LOCAL_ROWS, key=lambda r: r.scenario):
        if not any(values(runs, row.scenario, f, row.metric) for f in (base[0], other[0])):
            continue
        cells = [_cell(runs, row, f) for f in (base[0], other[0])]
        mine = median(runs, row.scenario, other[0], row.metric)
        theirs = median(runs, row.scenario, base[0], row.metric)
        ratio = ""
        if not row.total and theirs and not math.isnan(mine / theirs):
            ratio = f"{mine / theirs:.2f}×"
        title = titles.get(row.scenario, row.scenario)
        lines.append(f"| {title} | {row.label} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def values(runs: Runs, scenario: str, front: str, metric: str) -> list[float]:
    return [r[metric] for r in runs.get(scenario, {}).get(front, []) if metric in r]


def median(runs: Runs, scenario: str, front: str, metric: str) -> float:
    found = values(runs, scenario, front, metric)
    return statistics.median(found) if found else math.nan


def total(runs: Runs, scenario: str, front: str, metric: str) -> float:
    return float(sum(values(runs, scenario, front, metric)))


def _cell(runs: Runs, row: Row, front: str) -> str:
    if row.proxy_only and front == "direct":
        return "—"
    found = values(runs, row.scenario, front, row.metric)
    if not found:
        return "n/a"
    if row.total:
        return row.fmt.format(sum(found))
    mid = row.fmt.format(statistics.median(found))
    if len(found) == 1:
        return mid
    low, high = row.fmt.format(min(found)), row.fmt.format(max(found))
    return mid if low == high else f"{mid} ({low}–{high})"


def _ratio(runs: Runs, row: Row, other: str) -> str:
    if row.total or (row.proxy_only and other == "direct"):
        return ""
    mine = median(runs, row.scenario, "gateway", row.metric)
    theirs = median(runs, row.scenario, other, row.metric)
    if math.isnan(mine) or math.isnan(theirs) or theirs == 0:
        return ""
    return f"{mine / theirs:.2f}×"


def table(runs: Runs, titles: dict[str, str], hwm_mb: dict[str, float]) -> str:
    fronts = FRONTS
    head = f"| scenario | metric | {' | '.join(fronts)} | gateway÷direct | gateway÷nginx |"
    lines = [head, "|---|---|" + "---:|" * (len(fronts) + 2)]
    for row in sorted(ROWS, key=lambda r: r.scenario):
        if row.scenario not in runs:
            continue
        cells = [_cell(runs, row, f) for f in fronts]
        ratios = [_ratio(runs, row, "direct"), _ratio(runs, row, "nginx")]
        lines.append(f"| {titles[row.scenario]} | {row.label} | {' | '.join(cells + ratios)} |")
        if row.metric == "lat_p50_ms" and row.scenario == "a":
            added = [f"{added_latency(runs, f):.3f}" for f in fronts[1:]]
            lines.append(
                f"| {titles['a']} | added latency p50 vs direct (ms) | — | "
                f"{' | '.join(added)} |  |  |"
            )
    hwm = [f"{hwm_mb[f]:.1f}" if f in hwm_mb else "—" for f in fronts]
    ratio = (
        f"{hwm_mb['gateway'] / hwm_mb['nginx']:.2f}×"
        if hwm_mb.get("nginx") and "gateway" in hwm_mb
        else ""
    )
    label = "whole run | proxy peak RSS, kernel high-water mark (MB)"
    lines.append(f"| {label} | {' | '.join(hwm)} |  | {ratio} |")
    return "\n".join(lines)


def added_latency(runs: Runs, front: str) -> float:
    return median(runs, "a", front, "lat_p50_ms") - median(runs, "a", "direct", "lat_p50_ms")


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run (a front end or scenario left out)


def targets(runs: Runs) -> list[Check]:
    """Issue 5's targets, from the medians of this run."""

    def med(scenario: str, front: str, metric: str) -> float:
        return median(runs, scenario, front, metric)

    checks: list[Check] = []

    def add(name: str, target: str, value: float, measured: str, met: Callable[[], bool]) -> None:
        if math.isnan(value):
            checks.append(Check(name, target, "not measured", None))
            return
        try:
            ok = met()
        except (ValueError, ZeroDivisionError):
            ok = False
        checks.append(Check(name, target, measured, ok))

    if "a" in runs:
        added = added_latency(runs, "gateway")
        add(
            "(a) added latency, 1 client",
            "≤ 1 ms p50",
            added,
            f"{added:.3f} ms",
            lambda: added <= 1.0,
        )
    if "b" in runs:
        ttft = med("b", "gateway", "ttft_p50_ms") / med("b", "nginx", "ttft_p50_ms")
        tps = med("b", "gateway", "tokens_per_s") / med("b", "direct", "tokens_per_s")
        errors = total(runs, "b", "gateway", "errors")
        add("(b) TTFT p50 vs nginx", "≤ 1.2×", ttft, f"{ttft:.2f}×", lambda: ttft <= 1.2)
        add("(b) tokens/s vs direct", "≥ 0.95×", tps, f"{tps:.3f}×", lambda: tps >= 0.95)
        add("(b) errors", "0", errors, f"{errors:.0f}", lambda: errors == 0)
    if "c" in runs:
        rps = med("c", "gateway", "rps") / med("c", "nginx", "rps")
        add("(c) requests/s vs nginx", "≥ 0.5×", rps, f"{rps:.2f}×", lambda: rps >= 0.5)
        # The same on equal CPU: requests per proxy CPU-second, which does not depend on
        # whether the load generator's core or the proxy's was the limit.
        per_cpu = med("c", "nginx", "proxy_cpu_per_1k_req_s") / med(
            "c", "gateway", "proxy_cpu_per_1k_req_s"
        )
        add(
            "(c) requests per proxy CPU-second vs nginx",
            "≥ 0.5× (stricter reading)",
            per_cpu,
            f"{per_cpu:.2f}×",
            lambda: per_cpu >= 0.5,
        )
    if "d" in runs:
        rss = med("d", "gateway", "rss_peak_mb")
        add("(d) gateway peak RSS", "≤ 150 MB", rss, f"{rss:.1f} MB", lambda: rss <= 150)
    return checks


def targets_table(checks: Sequence[Check]) -> str:
    lines = ["| target | goal | measured | met |", "|---|---|---:|:---:|"]
    for c in checks:
        met = "—" if c.met is None else "yes" if c.met else "**no**"
        lines.append(f"| {c.name} | {c.target} | {c.measured} | {met} |")
    return "\n".join(lines)


def bottlenecks(runs: Runs) -> list[str]:
    """Plain-language notes on which core limited each proxy in (c)."""
    notes = []
    for front in FRONTS[1:]:
        proxy = median(runs, "c", front, "proxy_core_util")
        load = median(runs, "c", front, "load_core_util")
        if math.isnan(proxy):
            continue
        per_1k = median(runs, "c", front, "proxy_cpu_per_1k_req_s")
        ceiling = 1000 / per_1k if per_1k else math.nan
        if proxy >= 0.85:
            limit = "its own core was the limit"
        else:
            limit = (
                "its core had room left, so the load generator + upstream "
                f"({load:.0%} of a core) or the other processes were the limit"
            )
        notes.append(
            f"(c) {front}: proxy core {proxy:.0%} busy, {limit}; at "
            f"{per_1k:.3f} CPU-s per 1,000 requests one full core would pass about "
            f"{ceiling:,.0f} requests/s."
        )
    return notes


def error_count(runs: Runs) -> dict[str, float]:
    """Errors per front, over every scenario and repetition."""
    return {f: sum(total(runs, s, f, "errors") for s in runs) for f in FRONTS}


def chart(runs: Runs, path: Path, subtitle: str) -> bool:
    """TTFT and tokens/s (b), requests/s (c), proxy RSS (d) per front; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {
        "direct": "#888888",
        "nginx": "#2b8a3e",
        "gateway": "#1c7ed6",
    }
    fronts = FRONTS
    panels = [
        ("b", "ttft_p50_ms", "(b) TTFT p50 (ms)"),
        ("b", "ttft_p99_ms", "(b) TTFT p99 (ms)"),
        ("b", "tokens_per_s", "(b) tokens/s delivered"),
        ("c", "rps", "(c) requests/s"),
        ("d", "rss_peak_mb", "(d) proxy peak RSS (MB)"),
    ]
    panels = [p for p in panels if p[0] in runs]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    axes_list = list(axes) if len(panels) > 1 else [axes]
    for ax, (scenario, metric, title) in zip(axes_list, panels, strict=True):
        mids, lows, highs = [], [], []
        for front in fronts:
            found = values(runs, scenario, front, metric) or [math.nan]
            if metric == "rss_peak_mb" and front == "direct":
                found = [math.nan]  # no proxy, nothing to measure
            mid = statistics.median(found)
            mids.append(mid)
            lows.append(mid - min(found))
            highs.append(max(found) - mid)
        ax.bar(fronts, mids, color=[colors[f] for f in fronts], yerr=[lows, highs], capsize=4)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=9)
        for index, mid in enumerate(mids):
            if not math.isnan(mid):
                ax.annotate(
                    f"{mid:.1f}" if mid < 100 else f"{mid:.0f}",
                    (index, mid),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    fig.suptitle(f"vllm-fleet gateway overhead: median of repeats, bars = min–max\n{subtitle}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
