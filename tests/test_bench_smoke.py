"""`python -m bench --quick` runs the whole benchmark end to end (upstream, nginx from
`fleet nginx`, the gateway from `fleet up`) and produces the table with zero errors for
every front end. It asserts no timings: speed is compared in bench/, not in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fleet.nginx_run import NginxNotFound, find_nginx

ROOT = Path(__file__).resolve().parents[1]
FRONTS = ("direct", "nginx", "gateway")

pytestmark = pytest.mark.nginx


def test_quick_bench_produces_the_table_with_no_errors(tmp_path: Path) -> None:
    try:
        find_nginx()
    except NginxNotFound as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    saved = json.loads((tmp_path / "latest.json").read_text())
    runs, tokens = saved["runs"], saved["settings"]["stream_tokens"]
    for scenario in "abcd":
        for front in FRONTS:
            reps = runs[scenario][front]
            assert reps, f"({scenario}) {front}: no measurement"
            assert all(r["errors"] == 0 for r in reps), f"({scenario}) {front}: {reps}"
    for front in FRONTS:  # every stream delivered every token, at every front end
        assert all(r["tokens"] == r["streams"] * tokens for r in runs["b"][front])
        assert all(r["peak_concurrent"] == r["streams"] for r in runs["d"][front])

    table = (tmp_path / "latest.md").read_text()
    assert (
        "| scenario | metric | direct | nginx | gateway | gateway÷direct | gateway÷nginx |" in table
    )
    for label in ("TTFT p50 (ms)", "tokens/s delivered", "requests/s", "proxy peak RSS (MB)"):
        assert label in table
    assert table.strip() in done.stdout  # and the table is printed
    cost = table[table.index("## Routing policies: CPU per request") :]
    for row in ("| 1 short turn |", "| 20 turns, 1,000-word system prompt |"):
        assert row in cost, cost
