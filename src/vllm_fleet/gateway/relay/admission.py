"""Pacing: at most DISPATCH_PER_TURN new requests start per turn of the event loop.

A burst of new requests is taken a few at a time, with the engines' answers (first
tokens) relayed in between, instead of every new request first: under a burst, streams
already running keep flowing and early requests get their first token sooner. Light load
never reaches the limit. Imports nothing else from `relay/`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

# Requests started per turn of the event loop (bench/NOTES.md: the A/B runs behind 8).
DISPATCH_PER_TURN = 8


class Waiter(Protocol):
    """A client connection whose next request is complete and may start."""

    waiting: bool  # in the queue of connections waiting for a turn
    closed: bool

    def dispatch_next(self) -> None:
        """Start the request at the head of its queue (a no-op if it cannot any more)."""
        ...


class Admission:
    def __init__(self) -> None:
        self._budget = DISPATCH_PER_TURN
        self._turn: asyncio.Handle | None = None
        self._waiting: deque[Waiter] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def admit(self, conn: Waiter) -> bool:
        """Whether `conn` may start its next request now; if not, it waits its turn
        (in arrival order) and `conn.dispatch_next()` is called on a later turn."""
        if self._budget > 0 and not self._waiting:
            self._budget -= 1
            self._schedule_turn()
            return True
        if not conn.waiting:
            conn.waiting = True
            self._waiting.append(conn)
        self._schedule_turn()
        return False

    def _schedule_turn(self) -> None:
        if self._turn is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._turn = loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new turn of the event loop (I/O was polled since the last): a new budget,
        spent first on the connections waiting."""
        self._turn = None
        self._budget = DISPATCH_PER_TURN
        waiting = self._waiting
        while waiting and self._budget > 0:
            conn = waiting.popleft()
            conn.waiting = False
            if conn.closed:
                continue
            self._budget -= 1
            conn.dispatch_next()  # (a no-op for a connection closing meanwhile)
        if waiting:
            self._schedule_turn()
