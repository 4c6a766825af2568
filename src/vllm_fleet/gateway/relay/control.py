"""The relay's side of the admin route `POST /fleet/reload`: who may ask is decided in
`gateway/admin.py`; the fleet (`state.control`) plans and applies; the answer is given on
the client connection once the plan is decided (the change goes on in the background).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import Protocol

from vllm_fleet.gateway.admin import reload_request
from vllm_fleet.gateway.errors import Reply
from vllm_fleet.gateway.relay.request import Request, internal_error
from vllm_fleet.gateway.relay.state import ServerState

log = logging.getLogger(__name__)


class Answerer(Protocol):
    """The client connection, as the admin route answers on it."""

    closed: bool
    peer_bytes: bytes
    queue: deque[Request]

    def reply(self, reply: Reply) -> None: ...


def reload(conn: Answerer, state: ServerState, request: Request, method: str, query: str) -> None:
    """Answer POST /fleet/reload: refused at once, or when the fleet has planned it."""
    fleet = state.control
    assert fleet is not None
    asked = reload_request(
        state.core, method, query, bytes(request.body),
        conn.peer_bytes.decode("latin-1"), request.api_key, request.authorization,
    )  # fmt: skip
    if isinstance(asked, Reply):
        conn.reply(asked)
        return
    ask = asked

    async def answer() -> None:
        try:
            status, data = await fleet.reload(ask.file, ask.dry_run)
            reply = Reply(status, json.dumps(data).encode())
        except Exception:
            log.exception("reload failed")
            reply = internal_error()
        if not conn.closed and conn.queue and conn.queue[0] is request:
            conn.reply(reply)  # still the request this connection is answering

    task = asyncio.ensure_future(answer())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
