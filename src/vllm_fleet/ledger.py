"""The usage ledger: requests, errors and tokens by hour x key name x deployment, in SQLite.

`Ledger.record` runs on the gateway's event loop for every request: it adds to an
in-memory aggregate and does no I/O. A daemon thread writes what accumulated every
`flush_every` seconds, in one transaction of UPSERTs, so totals add up across flushes and
across restarts of `fleet up`. The database is in WAL mode: `fleet usage` reads it
(`read_usage`, read-only) while the fleet writes. Keys are counted by name, never by value.
"""

from __future__ import annotations

import datetime
import logging
import re
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

By = Literal["key", "deployment", "both"]
BY_CHOICES: tuple[By, ...] = ("key", "deployment", "both")
NO_KEY = "-"  # the key name of requests sent without a key
SCHEMA_VERSION = 1  # PRAGMA user_version
HOUR = 3600
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL,            -- start of the hour, unix seconds (UTC)
    key TEXT NOT NULL,                -- the key's name; '-' for requests without a key
    deployment TEXT NOT NULL,         -- '-' for requests that reached no deployment
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key, deployment)
) WITHOUT ROWID
"""
_UPSERT = """
INSERT INTO usage (hour, key, deployment, requests, errors, prompt_tokens, completion_tokens)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (hour, key, deployment) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""

# (hour, key name, deployment) -> [requests, errors, prompt_tokens, completion_tokens]
Pending = dict[tuple[int, str, str], list[int]]


class LedgerError(Exception):
    """The ledger cannot be read; the message says why and what to do."""


class LedgerMissing(LedgerError):
    """No ledger file yet (`fleet up` creates it)."""


def hour_of(now: float) -> int:
    """The start of the hour `now` falls in, in unix seconds."""
    return int(now // HOUR) * HOUR


class Ledger:
    """The writing side, owned by `fleet up`: `record` per request, a thread that flushes,
    `report` for `GET /fleet/usage`, `close` at shutdown."""

    def __init__(self, path: Path, flush_every: float = 2.0, busy_timeout: float = 5.0) -> None:
        """Open (or create) the ledger at `path` and start the flushing thread. A flush
        waits up to `busy_timeout` seconds for another writer of the file."""
        self.path = path
        self.flush_every = flush_every
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used under _write_lock by whichever thread flushes.
        self._db = sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)
        try:
            _create(self._db, path)
        except BaseException:
            self._db.close()
            raise
        self._pending: Pending = {}
        self._lock = threading.Lock()  # guards _pending only; never held while writing
        self._write_lock = threading.Lock()  # one flush at a time, and the connection
        self._failed: set[str] = set()  # kinds of write errors logged since the last success
        self._closed = False  # no more records
        self._shut = False  # the connection is closed
        self._late_warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-ledger", daemon=True)
        self._thread.start()

    def record(
        self,
        key: str | None,
        deployment: str,
        prompt_tokens: int,
        completion_tokens: int,
        error: bool,
        now: float | None = None,
    ) -> None:
        """Count one request: O(1), no I/O (called on the event loop)."""
        slot = (hour_of(time.time() if now is None else now), key or NO_KEY, deployment)
        with self._lock:
            closed = self._closed
            if not closed:
                counts = self._pending.setdefault(slot, [0, 0, 0, 0])
                counts[0] += 1
                counts[1] += int(error)
                counts[2] += prompt_tokens
                counts[3] += completion_tokens
        if closed and not self._late_warned:
            self._late_warned = True
            logger.warning(
                "usage ledger %s: a request recorded after close, not counted", self.path
            )

    def flush(self) -> None:
        """Write what is pending now, in one transaction (from any thread). On a write
        error the batch is kept for the next flush, and the error logged once per kind."""
        with self._write_lock:
            if self._shut:
                return
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                with self._db:  # one transaction: commit, or roll back on error
                    self._db.executemany(
                        _UPSERT, [(*slot, *counts) for slot, counts in batch.items()]
                    )
            except sqlite3.Error as exc:
                self._keep(batch)
                kind = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
                if kind not in self._failed:
                    self._failed.add(kind)
                    logger.error(
                        "usage ledger %s: cannot write (%s: %s); kept for the next flush",
                        *(self.path, kind, exc),
                    )
                return
            if self._failed:
                logger.warning("usage ledger %s: writing again", self.path)
                self._failed.clear()

    def close(self) -> None:
        """Stop the thread, write what is pending, close the database. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # under the lock: a record lands before the last flush, or not
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()
        with self._write_lock:
            self._shut = True
            self._db.close()
        if self._pending:
            lost = len(self._pending)
            logger.error("usage ledger %s: %d row(s) not written before close", self.path, lost)

    def report(self, since: float | None, by: By) -> dict[str, Any]:
        """Flush, then the usage since `since` (unix seconds; None: all), as JSON-able
        data for `GET /fleet/usage` (see `query`). Blocking: call it via a thread."""
        self.flush()
        with self._write_lock:
            if self._shut:
                raise LedgerError(f"the usage ledger {self.path} is closed")
            return query(self._db, since, by)

    def _keep(self, batch: Pending) -> None:
        """Put a batch that failed back, adding what was recorded meanwhile."""
        with self._lock:
            for slot, counts in batch.items():
                now = self._pending.setdefault(slot, [0, 0, 0, 0])
                for index, value in enumerate(counts):
                    now[index] += value

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every):
            try:
                self.flush()
            except Exception:  # never let the thread die; the next turn tries again
                logger.exception("usage ledger %s: flush failed", self.path)


def _create(db: sqlite3.Connection, path: Path) -> None:
    version = _version(db, path)
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"{path} is a usage ledger of a newer vllm-fleet (schema {version}, this one "
            f"knows {SCHEMA_VERSION}); upgrade vllm-fleet, or point gateway.usage_db elsewhere"
        )
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        logger.warning("usage ledger %s: WAL mode refused (%s); readers may wait", path, mode)
    with db:
        db.execute(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _version(db: sqlite3.Connection, path: Path) -> int:
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} is not a usage ledger ({exc})") from None


def query(db: sqlite3.Connection | None, since: float | None, by: By) -> dict[str, Any]:
    """`{"since", "by", "rows": [...], "totals": {...}}`: each row a key name and/or a
    deployment (per `by`) with requests, errors, prompt, completion and total tokens.
    An hour counts whole when `since` falls inside it. `db` None: no rows."""
    if by not in BY_CHOICES:
        raise ValueError(f"by must be one of {', '.join(BY_CHOICES)}, not {by!r}")
    groups = {"key": ["key"], "deployment": ["deployment"], "both": ["key", "deployment"]}[by]
    columns = ", ".join(groups)
    sums = ", ".join(f"SUM({name})" for name in COUNTERS)
    where, args = ("WHERE hour >= ?", [hour_of(since)]) if since is not None else ("", [])
    sql = f"SELECT {columns}, {sums} FROM usage {where} GROUP BY {columns} ORDER BY {columns}"
    rows: list[dict[str, Any]] = []
    totals = dict.fromkeys((*COUNTERS, "total_tokens"), 0)
    for record in db.execute(sql, args) if db is not None else ():
        row: dict[str, Any] = dict(zip(groups, record, strict=False))
        row.update(zip(COUNTERS, (int(v) for v in record[len(groups) :]), strict=True))
        row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        rows.append(row)
        for name in totals:
            totals[name] += row[name]
    return {"since": since, "by": by, "rows": rows, "totals": totals}


def read_usage(path: Path, since: float | None, by: By) -> dict[str, Any]:
    """`query` on a ledger file opened read-only, while `fleet up` may be writing it."""
    if not path.is_file():
        raise LedgerMissing(
            f"no usage ledger yet: the ledger is written by `fleet up` at {path} "
            "(gateway.usage_db), from its first request on"
        )
    try:
        with closing(_open_ro(path)) as db:
            if _version(db, path) == 0:  # created, its table not yet
                return query(None, since, by)
            return query(db, since, by)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the usage ledger {path}: {exc}") from None


def _open_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)


_SINCE = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
_UNITS = {"m": 60, "h": HOUR, "d": 24 * HOUR, "w": 7 * 24 * HOUR}
SINCE_FORMS = "a span back from now (30m, 24h, 7d, 2w) or a UTC date (2026-12-01)"


def parse_since(text: str, now: float | None = None) -> float:
    """`7d`, `24h`, `30m`, `2w` (back from now) or an ISO date `2026-12-01` (its start,
    UTC) as unix seconds; ValueError naming the accepted forms otherwise."""
    match = _SINCE.fullmatch(text)
    if match:
        return (time.time() if now is None else now) - int(match[1]) * _UNITS[match[2]]
    try:
        day = datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"`{text}` is not a time to count from; give {SINCE_FORMS}") from None
    start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return start.timestamp()
