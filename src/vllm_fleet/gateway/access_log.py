"""The access log (`gateway.access_log`): one JSON object per line, one line per request,
written off the event loop.

`write(record)` runs on the gateway's loop once per request and only puts the record (a
dict the gateway made: names, numbers, never a key or a body) on a bounded queue; it
never waits. A thread of its own (the stdlib's `QueueListener`) takes each record,
serialises it as one JSON line (orjson) and hands it to a `RotatingFileHandler`: before
a line would take the file to `max_bytes`, it is renamed `access.log.1` (older ones
shift to `.2` ... up to `keep`, the oldest dropped) and a new file begun, so the log
keeps what `engines.log_max_mb` and `engines.log_keep` keep for the engines' logs
(`keep` 0: the file is emptied instead).

When the disk cannot keep up and `queue_size` records wait already, a record is dropped
and counted (`dropped`; a warning on the first and every 10,000th), never the loop held
up. A line that cannot be written (a full disk) is counted in `errors` and warned about once; the
requests go on. `close()` writes what is queued, then stops the thread (idempotent).
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

QUEUE_SIZE = 10_000  # records waiting for the disk before new ones are dropped
_WARN_EVERY = 10_000


class _Rotating(logging.handlers.RotatingFileHandler):
    """Rotation by size as the stdlib does it; `keep` 0 empties the file instead (the
    stdlib would reopen it and go on growing). Failed writes are counted, not printed
    with a traceback each."""

    failures = 0  # lines that could not be written

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)  # noqa: SIM115

    def handleError(self, record: logging.LogRecord) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("cannot write the access log %s; lines are lost", self.baseFilename)


class _Listener(logging.handlers.QueueListener):
    """Takes the gateway's dicts off the queue and makes them JSON lines, in its thread."""

    def __init__(self, waiting: queue.Queue[Any], handler: logging.Handler) -> None:
        super().__init__(waiting, handler)
        self.waiting = waiting

    def prepare(self, record: Any) -> logging.LogRecord:
        line = orjson.dumps(record, default=str).decode()
        return logging.makeLogRecord({"msg": line})

    def enqueue_sentinel(self) -> None:
        self.waiting.put(None)  # the stdlib's sentinel; a full queue: wait for room (at close)


class AccessLog:
    """One JSON line per request into `path`, rotated at `max_bytes`, `keep` old files."""

    def __init__(self, path: Path, max_bytes: int, keep: int, queue_size: int = QUEUE_SIZE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dropped = 0  # records dropped because `queue_size` were waiting already
        self._queue: queue.Queue[Any] = queue.Queue(queue_size)
        # The handler that writes (from the listener's thread, holding `handler.lock`).
        self.handler = _Rotating(path, maxBytes=max_bytes, backupCount=keep, encoding="utf-8")
        self._listener: _Listener | None = _Listener(self._queue, self.handler)
        self._listener.start()

    @property
    def errors(self) -> int:
        """Lines that could not be written (a full disk, a file gone)."""
        return self.handler.failures

    def write(self, record: dict[str, Any]) -> None:
        """Queue one request's record; returns at once (drops it when the queue is full
        or the log is closed)."""
        if self._listener is None:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped % _WARN_EVERY == 1:
                log.warning(
                    "the access log %s cannot keep up: %d line(s) dropped so far",
                    self.path,
                    self.dropped,
                )

    def close(self) -> None:
        """Write every queued record, stop the thread, close the file; again: nothing."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.stop()
        self.handler.close()
        if self.dropped:
            log.warning("the access log %s dropped %d line(s)", self.path, self.dropped)
