"""The usage ledger on real SQLite files: hourly aggregates by key name x deployment,
totals that add up across flushes and restarts, WAL (a reader while a writer writes),
reports by key / deployment / both since a time, and a batch kept when a write fails."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_fleet.ledger import (
    SCHEMA_VERSION,
    Ledger,
    LedgerError,
    LedgerMissing,
    parse_since,
    read_usage,
)

H = 3600
T0 = 1_800_000_000 - 1_800_000_000 % H  # the start of an hour


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "usage.db"


@pytest.fixture
def ledger(db: Path) -> Iterator[Ledger]:
    # flush_every: far longer than a test, so only the test's own flush() writes.
    it = Ledger(db, flush_every=3600)
    yield it
    it.close()


def raw_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT hour, key, deployment, requests, errors, prompt_tokens, completion_tokens "
            "FROM usage ORDER BY hour, key, deployment"
        ).fetchall()


def test_requests_are_aggregated_by_hour_key_name_and_deployment(ledger: Ledger, db: Path) -> None:
    ledger.record("team-a", "qwen", 10, 20, False, now=T0 + 1)
    ledger.record("team-a", "qwen", 1, 2, True, now=T0 + H - 1)  # same hour
    ledger.record("team-a", "qwen", 100, 200, False, now=T0 + H)  # the next hour
    ledger.record("team-a", "embed", 5, 0, False, now=T0 + 2)
    ledger.record("team-b", "qwen", 3, 4, False, now=T0 + 3)
    ledger.record(None, "-", 0, 0, True, now=T0 + 4)  # no key, no deployment
    assert raw_rows(db) == []  # record() wrote nothing: it only counts in memory
    ledger.flush()
    assert raw_rows(db) == [
        (T0, "-", "-", 1, 1, 0, 0),
        (T0, "team-a", "embed", 1, 0, 5, 0),
        (T0, "team-a", "qwen", 2, 1, 11, 22),
        (T0, "team-b", "qwen", 1, 0, 3, 4),
        (T0 + H, "team-a", "qwen", 1, 0, 100, 200),
    ]


def test_totals_add_up_across_flushes_and_a_restart(db: Path) -> None:
    first = Ledger(db, flush_every=3600)
    first.record("team-a", "qwen", 10, 20, False, now=T0)
    first.flush()
    first.record("team-a", "qwen", 1, 2, True, now=T0)
    first.flush()
    first.flush()  # nothing pending: changes nothing
    first.record("team-a", "qwen", 100, 200, False, now=T0)
    first.close()  # the last records are written by close
    first.close()  # idempotent
    assert raw_rows(db) == [(T0, "team-a", "qwen", 3, 1, 111, 222)]

    second = Ledger(db, flush_every=3600)  # `fleet up` restarted
    second.record("team-a", "qwen", 1000, 2000, False, now=T0 + 5)
    second.close()
    assert raw_rows(db) == [(T0, "team-a", "qwen", 4, 1, 1111, 2222)]


def test_the_thread_flushes_on_its_own(db: Path) -> None:
    ledger = Ledger(db, flush_every=0.05)
    try:
        ledger.record("team-a", "qwen", 7, 8, False)
        deadline = time.monotonic() + 30
        while not raw_rows(db) and time.monotonic() < deadline:
            time.sleep(0.02)
        [(_, key, dep, requests, _, prompt, completion)] = raw_rows(db)
        assert (key, dep, requests, prompt, completion) == ("team-a", "qwen", 1, 7, 8)
    finally:
        ledger.close()
    assert not [t for t in threading.enumerate() if t.name == "fleet-ledger"]


def test_records_from_many_threads_during_flushes_all_count(ledger: Ledger, db: Path) -> None:
    per_thread, threads = 3000, 4
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            ledger.flush()

    def client(name: str) -> None:
        for _ in range(per_thread):
            ledger.record(name, "qwen", 2, 3, False, now=T0)

    flushing = threading.Thread(target=flusher)
    flushing.start()
    clients = [threading.Thread(target=client, args=(f"k{i % 2}",)) for i in range(threads)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    stop.set()
    flushing.join()
    ledger.flush()
    half = per_thread * threads // 2
    assert raw_rows(db) == [
        (T0, "k0", "qwen", half, 0, 2 * half, 3 * half),
        (T0, "k1", "qwen", half, 0, 2 * half, 3 * half),
    ]


def test_the_file_is_in_wal_mode_with_a_schema_version(ledger: Ledger, db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_ledger_of_a_newer_schema_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer vllm-fleet"):
        Ledger(db)
    with pytest.raises(LedgerError, match="not a usage ledger"):
        Ledger(Path(__file__))  # a file that is no SQLite database


def test_read_usage_reads_while_another_process_writes(ledger: Ledger, db: Path) -> None:
    ledger.record("team-a", "qwen", 10, 20, False, now=T0)
    ledger.flush()
    assert read_usage(db, None, "key")["totals"]["requests"] == 1
    ledger.record("team-a", "qwen", 1, 1, False, now=T0)
    ledger.flush()
    assert read_usage(db, None, "key")["totals"]["requests"] == 2
    # A writer in the middle of a transaction does not block the reader (WAL): it reads
    # the last committed state, and the read-only reader changes nothing.
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")  # in rollback-journal mode, readers wait
        writer.execute("UPDATE usage SET requests = 1000")
        assert read_usage(db, None, "key")["totals"]["requests"] == 2
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert read_usage(db, None, "key")["totals"]["requests"] == 2
    # And the ledger still writes after the reader came and went.
    ledger.record("team-b", "qwen", 1, 1, False, now=T0)
    assert ledger.report(None, "key")["totals"]["requests"] == 3


def test_read_usage_without_a_file_says_fleet_up_writes_it(tmp_path: Path) -> None:
    path = tmp_path / ".fleet" / "usage.db"
    with pytest.raises(LedgerMissing) as caught:
        read_usage(path, None, "both")
    assert str(path) in str(caught.value) and "`fleet up`" in str(caught.value)
    assert not path.exists()  # the reader created nothing


def fill(ledger: Ledger) -> None:
    ledger.record("team-a", "qwen", 10, 20, False, now=T0 - 2 * H)  # two hours before T0
    ledger.record("team-a", "qwen", 1, 2, True, now=T0 + 10)
    ledger.record("team-a", "embed", 5, 0, False, now=T0 + 20)
    ledger.record("team-b", "qwen", 100, 200, False, now=T0 + H + 30)
    ledger.record(None, "-", 0, 0, True, now=T0 + H + 40)


def test_report_by_key_deployment_or_both(ledger: Ledger) -> None:
    fill(ledger)
    by_key = ledger.report(None, "key")
    assert by_key["by"] == "key" and by_key["since"] is None
    assert by_key["rows"] == [
        {"key": "-", "requests": 1, "errors": 1, "prompt_tokens": 0,
         "completion_tokens": 0, "total_tokens": 0},
        {"key": "team-a", "requests": 3, "errors": 1, "prompt_tokens": 16,
         "completion_tokens": 22, "total_tokens": 38},
        {"key": "team-b", "requests": 1, "errors": 0, "prompt_tokens": 100,
         "completion_tokens": 200, "total_tokens": 300},
    ]  # fmt: skip
    totals = {"requests": 5, "errors": 2, "prompt_tokens": 116, "completion_tokens": 222,
              "total_tokens": 338}  # fmt: skip
    assert by_key["totals"] == totals
    by_dep = ledger.report(None, "deployment")
    assert [(r["deployment"], r["requests"], r["total_tokens"]) for r in by_dep["rows"]] == [
        ("-", 1, 0),
        ("embed", 1, 5),
        ("qwen", 3, 333),
    ]
    assert all("key" not in row for row in by_dep["rows"])
    assert by_dep["totals"] == totals
    both = ledger.report(None, "both")
    assert [(r["key"], r["deployment"], r["requests"]) for r in both["rows"]] == [
        ("-", "-", 1),
        ("team-a", "embed", 1),
        ("team-a", "qwen", 2),
        ("team-b", "qwen", 1),
    ]


def test_report_since_counts_the_hour_it_falls_in_whole(ledger: Ledger, db: Path) -> None:
    fill(ledger)
    # Half way into T0's hour: T0's hour counts whole, the one two hours before does not.
    since = ledger.report(T0 + H / 2, "key")
    assert since["since"] == T0 + H / 2
    assert [(r["key"], r["requests"]) for r in since["rows"]] == [
        ("-", 1),
        ("team-a", 2),
        ("team-b", 1),
    ]
    assert since["totals"]["prompt_tokens"] == 106
    # Past everything: no rows, totals of zero; read_usage answers the same as report.
    later = read_usage(db, T0 + 10 * H, "both")
    assert later["rows"] == [] and set(later["totals"].values()) == {0}
    assert read_usage(db, T0, "both") == ledger.report(T0, "both")


def test_a_failed_write_keeps_the_batch_and_logs_once(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(db, flush_every=3600, busy_timeout=0.05)
    caplog.set_level(logging.WARNING, logger="vllm_fleet.ledger")
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        ledger.record("team-a", "qwen", 10, 20, False, now=T0)
        ledger.flush()
        ledger.record("team-a", "qwen", 1, 2, False, now=T0)  # recorded while failing
        ledger.flush()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors  # once per kind, not per flush
        assert "database is locked" in errors[0].getMessage()
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    ledger.flush()
    assert raw_rows(db) == [(T0, "team-a", "qwen", 2, 0, 11, 22)]  # nothing lost
    assert "writing again" in caplog.text
    ledger.close()


def test_a_record_after_close_is_not_counted_and_says_so(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(db, flush_every=3600)
    ledger.close()
    ledger.record("team-a", "qwen", 1, 1, False)
    ledger.flush()  # a no-op after close
    assert raw_rows(db) == []
    assert "after close" in caplog.text
    with pytest.raises(LedgerError, match="closed"):
        ledger.report(None, "key")


def test_parse_since_forms() -> None:
    now = 1_800_000_000.0
    assert parse_since("30m", now=now) == now - 30 * 60
    assert parse_since("24h", now=now) == now - 24 * H
    assert parse_since("7d", now=now) == now - 7 * 24 * H
    assert parse_since("2w", now=now) == now - 14 * 24 * H
    assert parse_since("2026-12-01") == 1_796_083_200.0  # midnight UTC
    assert abs(parse_since("1h") - (time.time() - H)) < 60


@pytest.mark.parametrize("text", ["", "7", "d", "7y", "-7d", "1.5h", "yesterday", "2026-13-01"])
def test_parse_since_refuses_other_input_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_since(text)
    message = str(caught.value)
    assert all(form in message for form in ("30m", "24h", "7d", "2w", "2026-12-01"))
