"""Lingering close: after an answer given before the whole request was read, read and
drop what the client still sends, within bounds, then close. Imports no relay module.

An answer given early (413 at the head, 401 before the body, 400 for a malformed body,
503 past the connection limit) leaves the client still sending. Closing then, with its
bytes unread, makes the kernel send a reset, and a client that sends its whole body
before it reads (urllib, requests, httpx, the openai SDK) gets `Connection reset by peer`
instead of the answer. So, as nginx's `lingering_close`: the answer goes out, the write
side is shut (the client sees the end of the answer), and reading goes on, every byte
dropped, until the client closes or one of three bounds ends it:

- `lingering_timeout`: seconds without a byte from the client (nginx: 5 s);
- `lingering_time`: seconds in all since the answer (nginx: 30 s);
- `lingering_max_mb`: bytes dropped since the request was refused (nginx has no such
  bound; a client sending forever is cut off here, even before `lingering_time`).

Over TLS there is no half-close (an SSL transport cannot `write_eof`): the answer goes
out with `Connection: close` and its length, reading and dropping goes on the same way,
within the same bounds, and the client, which has its whole answer, closes.

At a bound the connection is dropped at once (`abort`: a client still sending gets a
reset, as it would have without lingering). Only connections that refused a request
linger: nothing here runs for a request read whole.
"""

from __future__ import annotations

import asyncio


class Linger:
    """The lingering close of one client connection (made when its parser stops)."""

    __slots__ = ("_deadline", "_last", "_left", "_timer", "_transport", "time", "timeout")

    def __init__(self, time: float, timeout: float, max_bytes: int) -> None:
        self.time = time  # seconds of lingering in all; 0: close at once
        self.timeout = timeout  # seconds of silence that end it
        self._left = max_bytes  # bytes that may still be dropped
        self._transport: asyncio.Transport | None = None  # set once lingering started
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._last = 0.0  # loop time of the last byte read while lingering

    @property
    def started(self) -> bool:
        return self._transport is not None

    def dropped(self, size: int, transport: asyncio.Transport | None) -> None:
        """`size` bytes read from the client and dropped."""
        self._left -= size
        if self._left < 0:
            if transport is not None:
                transport.abort()  # over the bound: cut off, started or not
            return
        if self._transport is not None:
            self._last = asyncio.get_running_loop().time()

    def start(self, transport: asyncio.Transport, reading_paused: bool) -> None:
        """The answer is written: shut the write side (once it has gone out; not over
        TLS) and read on, dropping everything, until the client closes or a bound is
        reached."""
        if self.time <= 0:
            transport.close()
            return
        self._transport = transport
        loop = asyncio.get_running_loop()
        now = self._last = loop.time()
        self._deadline = now + self.time
        if transport.can_write_eof():
            transport.write_eof()
        if reading_paused:
            transport.resume_reading()
        self._timer = loop.call_later(min(self.timeout, self.time), self._check)

    def _check(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet_until = self._last + self.timeout
        if now >= self._deadline or now >= quiet_until:
            transport.abort()
            return
        self._timer = loop.call_at(min(quiet_until, self._deadline), self._check)

    def cancel(self) -> None:
        """The connection is gone."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
