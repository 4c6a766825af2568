"""What the server and its client connections share: the connections, the tasks,
`closing`, the connection limit and `core` (the one reference a reload swaps).

As uvicorn's `ServerState`: it imports nothing else from `relay/`. Client connections
add and remove themselves; the server walks `connections` to sweep and to close.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from vllm_fleet.gateway.core import Core


class Connection(Protocol):
    """A client connection, as the server walks it."""

    busy: bool  # a request is being answered
    last_active: float  # time.monotonic() of its last read or answer
    transport: asyncio.Transport | None

    def idle(self) -> bool:
        """No request in flight and none queued."""
        ...

    def close(self) -> None:
        """Close once what is written has gone out."""
        ...

    def head_overdue(self, since: float) -> bool:
        """A request head still arriving that began before `since`."""
        ...

    def head_timed_out(self, seconds: float) -> None:
        """Answer 408 and close: its head took over `seconds`."""
        ...


class Control(Protocol):
    """The running fleet, as the gateway's admin endpoints reach it (fleet_control.py)."""

    async def reload(self, file: str | None, dry_run: bool) -> tuple[int, dict[str, Any]]:
        """Reload from `file` (None: the fleet's own file), or only plan it; the HTTP
        status and the JSON answer."""
        ...

    async def restart(self, engine: str) -> tuple[int, dict[str, Any]]:
        """Restart one engine by hand (fleet_control.py); the HTTP status and the answer."""
        ...


class ServerState:
    __slots__ = (
        "closing", "connections", "control", "core", "drained", "max_connections", "tasks",
    )  # fmt: skip

    def __init__(self, core: Core, max_connections: int) -> None:
        self.core = core  # read once per request, where its answer is decided
        self.max_connections = max_connections  # past it, a connection is answered 503
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False  # stopping: no request starts, connections close when done
        self.drained = asyncio.Event()  # set once closing and nothing is in flight
        self.control: Control | None = None  # reloads; None: not served (tests)

    def check_drained(self) -> None:
        """While closing: note when no connection has a request in flight any more."""
        if self.closing and all(c.idle() for c in self.connections):
            self.drained.set()
