"""The relay's side of the admin routes: who may ask is decided in `gateway/admin.py`.

`POST /fleet/reload`: the fleet (`state.control`) plans and applies; the answer is given
on the client connection once the plan is decided (the change goes on in the background).
`GET /fleet/usage`: the ledger is read in a thread, off the event loop.
`POST /fleet/deployments/{id}/load|unload`: answered once the deployment is loaded or
unloaded (the fleet's on-demand queues, `core.demand`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Coroutine
from typing import Any, Protocol

from vllm_fleet.gateway.admin import Asker, deployment_request, reload_request, usage_request
from vllm_fleet.gateway.errors import Reply, not_on_demand
from vllm_fleet.gateway.relay.request import Request, internal_error
from vllm_fleet.gateway.relay.state import ServerState

log = logging.getLogger(__name__)


def asker(conn: Answerer, request: Request) -> Asker:
    """Where `request` comes from, for the routes that change the fleet (admin.py)."""
    origin = fetch_site = None
    lines = request.lines
    for i in range(0, len(lines), 4):
        name = lines[i].lower()
        if name == b"origin":
            origin = lines[i + 2]
        elif name == b"sec-fetch-site":
            fetch_site = lines[i + 2]
    if fetch_site is not None:
        cross = fetch_site.lower() in (b"cross-site", b"same-site")
    elif origin is not None:
        cross = origin.partition(b"://")[2] != (request.host or b"")
    else:
        cross = False
    return Asker(conn.peer_bytes.decode("latin-1"), bool(request.forwarded_for), cross)


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
        state.core, method, query, bytes(request.body), asker(conn, request), request.api_key,
        request.authorization,
    )  # fmt: skip
    if isinstance(asked, Reply):
        conn.reply(asked)
        return
    ask = asked

    async def answer() -> Reply:
        status, data = await fleet.reload(ask.file, ask.dry_run)
        return Reply(status, json.dumps(data).encode())

    answer_later(conn, state, request, answer(), "reload failed")


def usage(conn: Answerer, state: ServerState, request: Request, query: str) -> None:
    """Answer GET /fleet/usage from the ledger."""
    asked = usage_request(state.core, query, request.api_key, request.authorization)
    if isinstance(asked, Reply):
        conn.reply(asked)
        return
    ledger = state.core.accounting.ledger
    assert ledger is not None  # usage_request said so
    ask = asked

    async def answer() -> Reply:
        data = await asyncio.to_thread(ledger.report, ask.since, ask.by)  # type: ignore[arg-type]
        return Reply(200, json.dumps(data).encode())

    answer_later(conn, state, request, answer(), "reading the usage ledger failed")


def deployment(
    conn: Answerer, state: ServerState, request: Request, method: str, path: str
) -> None:
    """Answer POST /fleet/deployments/{id}/load or /unload."""
    core = state.core
    asked = deployment_request(
        core, method, path, asker(conn, request), request.api_key, request.authorization
    )
    if isinstance(asked, Reply):
        conn.reply(asked)
        return
    demand = core.demand
    if demand is None:
        conn.reply(not_on_demand(asked.deployment))
        return
    ask = asked

    async def answer() -> Reply:
        act = demand.load if ask.action == "load" else demand.unload
        status, data = await act(ask.deployment)
        return Reply(status, json.dumps(data).encode())

    answer_later(conn, state, request, answer(), f"{ask.action} failed")


def answer_later(
    conn: Answerer,
    state: ServerState,
    request: Request,
    answer: Coroutine[Any, Any, Reply],
    failed: str,
) -> None:
    """Answer `request` with what `answer` gives, once it has (a 500 if it raises)."""

    async def run() -> None:
        try:
            reply = await answer
        except Exception:
            log.exception(failed)
            reply = internal_error()
        if not conn.closed and conn.queue and conn.queue[0] is request:
            conn.reply(reply)  # still the request this connection is answering

    task = asyncio.ensure_future(run())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)
