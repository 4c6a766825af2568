"""`python -m bench.routing --quick` runs the routing benchmark end to end on fake engines
with a prefix cache of their own (`fake_prefix`): nginx from `fleet nginx`, `fleet up`
switched from `least_outstanding` to `prefix` by a reload, and vllm-router when
`make router-env` has installed it. It asserts what routing decides, never timings: the
prefix policy keeps every conversation on one replica and gets the most cache hits, and
the control workload shares no prefix under any setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.routing import router
from vllm_fleet.nginx_run import NginxNotFound, find_nginx

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.nginx


def test_quick_routing_bench_runs_every_setup_and_prefix_routing_keeps_conversations(
    tmp_path: Path,
) -> None:
    try:
        find_nginx()
    except NginxNotFound as exc:
        pytest.skip(str(exc))
    setups = ["nginx", "least_outstanding", "prefix"]
    if router.router_binary(ROOT) is not None:
        setups.append("vllm-router")
    elif os.environ.get("CI"):
        pytest.fail("vllm-router is not installed: `make test` installs it (make router-env)")
    out = tmp_path / "routing.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.routing", "--quick", "--out", str(out),
         "--setups", ",".join(setups)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    rows = {
        (r["workload"], r["setup"]): r for r in json.loads(out.with_suffix(".json").read_text())
    }
    names = {
        "nginx": "nginx round robin",
        "least_outstanding": "fleet least_outstanding",
        "prefix": "fleet prefix",
        "vllm-router": "vllm-router cache_aware",
    }
    for setup in setups:
        for workload in ("multi-turn", "interleaved", "control"):
            r = rows[(workload, names[setup])]
            assert r["requests"] > 0 and r["errors"] == 0, r
            assert r["ttft_p50"] > 0 and r["latency_p50"] >= r["ttft_p50"], r
            assert len(r["split"]) == 2 and abs(sum(r["split"]) - 1) < 1e-6, r
    for workload in ("multi-turn", "interleaved"):
        multi = {s: rows[(workload, names[s])] for s in setups}
        # Prefix routing: every turn of a conversation where its first went, both replicas
        # used, and no setup's engines hit more cached tokens (the fake cache evicts
        # nothing here, so a conversation kept on one replica hits all it can).
        assert multi["prefix"]["kept"] == 1.0, (workload, multi["prefix"])
        assert min(multi["prefix"]["split"]) > 0, (workload, multi["prefix"])
        for other in setups:
            assert multi["prefix"]["hit_rate"] >= multi[other]["hit_rate"] - 1e-9, (workload, other)
        # Turn 2 onwards repeats the history: every setup hits something there.
        assert all(r["hit_rate"] > 0.2 for r in multi.values()), (workload, multi)
    # Conversations taking turns, an odd number of them: round robin sends a conversation's
    # next turn to the other replica, so its engines miss what prefix routing hits.
    interleaved = {s: rows[("interleaved", names[s])] for s in setups}
    assert interleaved["prefix"]["hit_rate"] > interleaved["nginx"]["hit_rate"], interleaved
    # The control shares nothing, wherever it goes.
    assert all(rows[("control", names[s])]["hit_rate"] < 0.05 for s in setups), rows
    text = out.read_text()
    assert "| multi-turn | fleet prefix |" in text and "Goals (issue 16" in text
