"""`python -m chaos --quick` runs every chaos scenario end to end with small counts
(`make chaos` runs the full ones) and every invariant holds. It asserts no timings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_chaos_holds_every_invariant(tmp_path: Path) -> None:
    out = tmp_path / "chaos.md"
    done = subprocess.run(
        [sys.executable, "-m", "chaos", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = out.read_text()
    for scenario in "abcd":
        assert f"## ({scenario}) " in report
    assert report.count("every invariant held") == 4, report
    assert "BROKEN" not in report
