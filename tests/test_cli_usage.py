"""`fleet usage` and `fleet keys` as a person runs them: real subprocesses, a real ledger
file filled by `Ledger`, their exit codes and what they print."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from vllm_fleet.config import load
from vllm_fleet.ledger import Ledger

H = 3600
T0 = 1_800_000_000 - 1_800_000_000 % H
FLEET = "deployments:\n  qwen: {model: Qwen/Qwen2.5-1.5B-Instruct}\n  embed: {model: e}\n"


def fleet(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        input=stdin,
        timeout=60,
        check=False,
    )


def filled_fleet(tmp_path: Path, gateway: str = "") -> Path:
    """A fleet file in tmp_path/conf and its ledger (the default place, next to it)."""
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "fleet.yaml"
    path.write_text(FLEET + gateway, encoding="utf-8")
    ledger = Ledger(tmp_path / "conf" / ".fleet" / "usage.db", flush_every=3600)
    ledger.record("team-a", "qwen", 1000, 2000, False, now=T0)
    ledger.record("team-a", "qwen", 10, 20, True, now=T0 + 1)
    ledger.record("team-a", "embed", 5, 0, False, now=T0 + 2)
    ledger.record("team-b", "qwen", 100, 200, False, now=T0 + H)
    ledger.record(None, "-", 0, 0, True, now=T0 + H)
    ledger.close()
    return path


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]


def test_usage_prints_a_table_with_totals_from_the_file_s_ledger(tmp_path: Path) -> None:
    path = filled_fleet(tmp_path)
    # Run elsewhere: the ledger's path is relative to the fleet file, not to the cwd.
    done = fleet("usage", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"usage by key x deployment, all of the ledger: {path.parent / '.fleet' / 'usage.db'}"
    )
    rows = [cells(line) for line in lines if "│" in line or "┃" in line]
    assert rows == [
        ["key", "deployment", "requests", "errors", "prompt", "completion", "total"],
        ["(no key)", "(none)", "1", "1", "0", "0", "0"],
        ["team-a", "embed", "1", "0", "5", "0", "5"],
        ["team-a", "qwen", "2", "1", "1,010", "2,020", "3,030"],
        ["team-b", "qwen", "1", "0", "100", "200", "300"],
        ["total", "", "5", "2", "1,115", "2,220", "3,335"],
    ]


def test_usage_by_key_since_a_date(tmp_path: Path) -> None:
    path = filled_fleet(tmp_path)
    done = fleet("usage", str(path), "--by", "key", "--since", "2020-01-01", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage by key, since 2020-01-01 00:00 UTC" in done.stdout
    rows = [cells(line) for line in done.stdout.splitlines() if "│" in line]
    assert rows == [
        ["(no key)", "1", "1", "0", "0", "0"],
        ["team-a", "3", "1", "1,015", "2,020", "3,035"],
        ["team-b", "1", "0", "100", "200", "300"],
        ["total", "5", "2", "1,115", "2,220", "3,335"],
    ]
    # A day after every record: nothing, said in words.
    later = fleet("usage", str(path), "--since", "2030-01-01", cwd=tmp_path)
    assert later.returncode == 0, later.stderr
    assert later.stdout.splitlines()[-1] == "no requests recorded"


def test_usage_json_by_deployment(tmp_path: Path) -> None:
    path = filled_fleet(tmp_path)
    done = fleet("usage", str(path), "--by", "deployment", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["by"] == "deployment" and data["since"] is None
    assert [(r["deployment"], r["requests"], r["total_tokens"]) for r in data["rows"]] == [
        ("-", 1, 0),
        ("embed", 1, 5),
        ("qwen", 3, 3330),
    ]
    assert data["totals"] == {
        "requests": 5,
        "errors": 2,
        "prompt_tokens": 1115,
        "completion_tokens": 2220,
        "total_tokens": 3335,
    }


def test_usage_reads_the_ledger_gateway_usage_db_names(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET + "gateway: {usage_db: ledgers/u.db}\n", encoding="utf-8")
    ledger = Ledger(tmp_path / "ledgers" / "u.db", flush_every=3600)
    ledger.record("ops", "embed", 1, 1, False)
    ledger.close()
    done = fleet("usage", str(path), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [row["key"] for row in json.loads(done.stdout)["rows"]] == ["ops"]


def test_usage_without_a_ledger_configured_says_so(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET + "gateway: {usage_db: null}\n", encoding="utf-8")
    done = fleet("usage", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert "keeps no usage ledger (gateway.usage_db: null)" in done.stderr
    assert done.stdout == ""


def test_usage_before_the_fleet_wrote_a_ledger_names_where_it_will_be(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET, encoding="utf-8")
    done = fleet("usage", str(path), cwd=tmp_path)
    assert done.returncode == 1
    where = tmp_path / ".fleet" / "usage.db"
    assert f"written by `fleet up` at {where}" in done.stderr
    assert not where.exists()


def test_usage_refuses_a_bad_since_naming_the_forms(tmp_path: Path) -> None:
    path = filled_fleet(tmp_path)
    done = fleet("usage", str(path), "--since", "last week", cwd=tmp_path)
    assert done.returncode == 2
    assert "7d" in done.stderr and "2026-12-01" in done.stderr


def test_usage_with_a_broken_fleet_file_prints_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("deployments: {}\ngateway: {usage_dbx: a.db}\n", encoding="utf-8")
    done = fleet("usage", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert "usage_dbx" in done.stderr


def test_keys_new_prints_a_key_and_a_line_that_loads_with_its_digest(tmp_path: Path) -> None:
    done = fleet(
        "keys", "new", "team-a", "--deployments", "qwen,embed", "--rpm", "600", "--tpm",
        "200000", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    key, line = done.stdout.splitlines()
    assert re.fullmatch(r"sk-fleet-[A-Za-z0-9_-]{43}", key)
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert line == (
        f"- {{name: team-a, key_sha256: {digest}, deployments: [qwen, embed], rpm: 600, "
        "tpm: 200000}"
    )
    assert "shown this once" in done.stderr and "SHA-256" in done.stderr
    assert key not in done.stderr
    # Pasted under gateway.keys, it loads, with that key's digest and nothing of the key.
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET + f"gateway:\n  keys:\n    {line}\n", encoding="utf-8")
    assert key not in path.read_text(encoding="utf-8")
    [loaded] = load(path).gateway.keys
    assert (loaded.name, loaded.digest, loaded.deployments) == ("team-a", digest, ["qwen", "embed"])
    assert (loaded.rpm, loaded.tpm, loaded.admin) == (600, 200000, False)
    # And `fleet keys hash` gives the same digest for the key.
    hashed = fleet("keys", "hash", cwd=tmp_path, stdin=key + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == digest


def test_keys_new_defaults_to_every_deployment_and_marks_admin(tmp_path: Path) -> None:
    first = fleet("keys", "new", "ops", "--admin", cwd=tmp_path)
    second = fleet("keys", "new", "ops2", cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    (key1, line1), (key2, line2) = first.stdout.splitlines(), second.stdout.splitlines()
    assert key1 != key2  # fresh each time
    assert line1.endswith("deployments: '*', admin: true}")
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET + f"gateway:\n  keys:\n  {line1}\n  {line2}\n", encoding="utf-8")
    ops, ops2 = load(path).gateway.keys
    assert ops.admin and ops.deployments == "*" and ops.allows("embed")
    assert not ops2.admin and ops2.digest == hashlib.sha256(key2.encode()).hexdigest()


def test_keys_new_refuses_a_bad_name(tmp_path: Path) -> None:
    done = fleet("keys", "new", "team a", cwd=tmp_path)
    assert done.returncode == 2
    assert "is not a key name" in done.stderr
    assert done.stdout == ""  # no key printed
