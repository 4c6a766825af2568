"""`fleet usage`: the ledger's report (`ledger.read_usage`) as a table, totals last."""

from __future__ import annotations

import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from vllm_fleet.ledger import COUNTERS, NO_KEY

NUMBERS = (*COUNTERS, "total_tokens")
HEADINGS = {
    "requests": "requests",
    "errors": "errors",
    "prompt_tokens": "prompt",
    "completion_tokens": "completion",
    "total_tokens": "total",
}
NOBODY = {"key": "(no key)", "deployment": "(none)"}


def describe_since(since: float | None) -> str:
    if since is None:
        return "all of the ledger"
    start = datetime.datetime.fromtimestamp(since, tz=datetime.UTC)
    hour = start.replace(minute=0, second=0, microsecond=0)
    return f"since {hour:%Y-%m-%d %H:00} UTC (hours are counted whole)"


def render_usage(data: dict[str, Any], source: str) -> Group:
    """A heading (what was read, since when), one row per key and/or deployment, a
    totals row; or a line saying no request was recorded."""
    groups = ["key", "deployment"] if data["by"] == "both" else [str(data["by"])]
    heading = Text(f"usage by {' x '.join(groups)}, {describe_since(data['since'])}: ")
    heading.append(source, style="dim")
    if not data["rows"]:
        return Group(heading, Text("no requests recorded"))
    table = Table(header_style="bold")
    for group in groups:
        table.add_column(group)
    for name in NUMBERS:
        table.add_column(HEADINGS[name], justify="right")
    for row in data["rows"]:
        names = [NOBODY[g] if row[g] == NO_KEY else str(row[g]) for g in groups]
        table.add_row(*names, *(f"{row[name]:,}" for name in NUMBERS))
    table.add_section()
    totals = data["totals"]
    table.add_row(
        Text("total", style="bold"),
        *([""] * (len(groups) - 1)),
        *(Text(f"{totals[name]:,}", style="bold") for name in NUMBERS),
    )
    return Group(heading, table)
