"""`gateway.access_log`'s writer: one JSON line per record, in order, rotated at
`max_bytes` keeping `keep` old files; `write` on the event loop never waits for the disk
(a held writer shows it), a full queue drops and counts; `close` writes everything."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from vllm_fleet.gateway.access_log import AccessLog


def record(n: int) -> dict[str, Any]:
    """A record as the gateway makes one (names and numbers, never a key or a body)."""
    return {
        "time": 1767225600.0 + n,
        "key": "team-a",
        "deployment": "qwen",
        "route": "path",
        "method": "POST",
        "path": "/qwen/v1/chat/completions",
        "status": 200,
        "latency_ms": 12.5,
        "ttfb_ms": 3.25,
        "prompt_tokens": 7,
        "completion_tokens": n,
        "bytes_in": 120,
        "bytes_out": 640,
        "client": "127.0.0.1",
    }


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_record_is_one_json_line_in_order(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"  # the directory is made
    log = AccessLog(path, max_bytes=100 << 20, keep=3)
    for n in range(2000):
        log.write(record(n))
    log.close()
    assert lines(path) == [record(n) for n in range(2000)]
    assert log.dropped == 0 and log.errors == 0


def test_rotation_at_max_bytes_keeps_keep_files(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    size = len(json.dumps(record(100), separators=(",", ":"))) + 1
    log = AccessLog(path, max_bytes=10 * size, keep=2)
    for n in range(100, 200):
        log.write(record(n))
    log.close()
    files = [path.with_name("access.log.2"), path.with_name("access.log.1"), path]
    assert not path.with_name("access.log.3").exists()  # at most `keep` old files
    kept: list[dict[str, Any]] = []
    for file in files:
        assert file.stat().st_size < 10 * size  # rotated before a line would pass it
        kept += lines(file)
    # The newest records, oldest first, none lost between the files.
    numbers = [r["completion_tokens"] for r in kept]
    assert numbers == list(range(numbers[0], 200))
    # Each old file is full: as many lines as fit under max_bytes (9 of 10).
    assert [len(lines(file)) for file in files[:2]] == [9, 9]


def test_keep_0_empties_the_file_instead(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, max_bytes=2000, keep=0)
    for n in range(100):
        log.write(record(n))
    log.close()
    assert path.stat().st_size < 2000
    assert not path.with_name("access.log.1").exists()
    assert lines(path)[-1] == record(99)


def test_write_on_the_loop_returns_before_the_disk_is_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, max_bytes=100 << 20, keep=1)

    async def requests() -> None:
        for n in range(500):
            log.write(record(n))

    # The writer thread takes `handler.lock` for every line: held here, no line can be
    # written, so every write below returned without waiting for the disk.
    with log.handler.lock:
        asyncio.run(requests())
        assert path.stat().st_size == 0
    log.close()  # and close writes what was queued
    assert lines(path) == [record(n) for n in range(500)]


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, max_bytes=100 << 20, keep=1, queue_size=10)
    with log.handler.lock:  # the disk "cannot keep up"
        for n in range(100):
            log.write(record(n))
        # 10 wait in the queue, and the writer may hold one more, blocked on the disk.
        assert log.dropped in (89, 90)
    log.close()
    written = lines(path)
    assert len(written) == 100 - log.dropped
    assert written == [record(n) for n in range(len(written))]  # the first ones, in order


def test_close_twice_and_writes_after_close_are_harmless(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path, max_bytes=1 << 20, keep=1)
    log.write(record(1))
    log.close()
    log.close()
    log.write(record(2))  # the gateway stopping: dropped, silently
    assert lines(path) == [record(1)]
