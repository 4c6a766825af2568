"""The relay's side of the status page and the Prometheus routes (who may ask is decided
in `gateway/admin.py`, what is answered in `gateway/overview.py`, `targets.py`, `assets.py`):

- `GET /fleet/` and `/fleet/assets/{file}`: the page itself (no key: it holds no data);
- `GET /fleet/overview`: the page's data; the log tails it shows and the GPUs' use
  (nvidia-smi, read at most every GPU_EVERY seconds) are read in a thread;
- `GET /fleet/targets`: the engines as Prometheus HTTP service discovery;
- `GET /fleet/engines/{engine}/metrics`: that engine's own `/metrics`, fetched over its
  port or Unix socket (Prometheus cannot open a socket, nor reach another machine's
  loopback);
- `POST /fleet/engines/{engine}/restart`: the fleet restarts it (`state.control`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import aiohttp

from vllm_fleet.engines.supervisor import read_log_tail
from vllm_fleet.gateway.admin import ENGINES_PATH, engine_request, metrics_denied
from vllm_fleet.gateway.assets import is_page_path, page_reply
from vllm_fleet.gateway.core import Core
from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.overview import Readings, overview, wants_tail
from vllm_fleet.gateway.relay.control import Answerer, answer_later, asker
from vllm_fleet.gateway.relay.request import Request
from vllm_fleet.gateway.relay.state import ServerState
from vllm_fleet.gateway.targets import scrape_targets
from vllm_fleet.gpus import GpuUse, read_gpu_use
from vllm_fleet.plan import EngineSpec

OVERVIEW_PATH = "/fleet/overview"
TARGETS_PATH = "/fleet/targets"
GPU_EVERY = 5.0  # seconds a GPU reading is shown before nvidia-smi is asked again
METRICS_TIMEOUT = 10.0  # seconds an engine's /metrics may take (Prometheus' own default)
METRICS_MAX_BYTES = 8 << 20
_READ_ONLY = ("GET", "HEAD")


class _GpuReading:
    """The last GPU reading of this process, and when it was taken."""

    def __init__(self) -> None:
        self.use: GpuUse | None = None
        self.at = 0.0
        self.lock = asyncio.Lock()

    async def now(self) -> GpuUse:
        async with self.lock:  # one nvidia-smi at a time, whoever asks
            if self.use is None or time.monotonic() - self.at >= GPU_EVERY:
                self.use = await asyncio.to_thread(read_gpu_use)
                self.at = time.monotonic()
            return self.use


_gpus = _GpuReading()


def handles(path: str) -> bool:
    return (
        is_page_path(path) or path in (OVERVIEW_PATH, TARGETS_PATH) or path.startswith(ENGINES_PATH)
    )


def answer(
    conn: Answerer, state: ServerState, request: Request, method: str, path: str, query: str
) -> None:
    """Answer one of the routes `handles()` said yes to."""
    core = state.core
    if path.startswith(ENGINES_PATH):
        who = asker(conn, request)
        asked = engine_request(core, method, path, who, request.api_key, request.authorization)
        if isinstance(asked, Reply):
            conn.reply(asked)
        elif asked.action == "restart":
            _restart(conn, state, request, asked.engine)
        else:
            _engine_metrics(conn, state, request, asked.engine)
        return
    if method not in _READ_ONLY:
        conn.reply(
            error_reply(
                405, f"{path} takes GET", "method_not_allowed", headers={"Allow": "GET, HEAD"}
            )
        )
        return
    if is_page_path(path):
        conn.reply(page_reply(path))
        return
    if path == TARGETS_PATH:
        denied = metrics_denied(core, request.api_key, request.authorization, path)
        if denied is not None:
            conn.reply(denied)
            return
        via = any(p in ("via=gateway", "via=gateway/") for p in query.split("&"))
        address = request.host.decode("latin-1") if request.host else _own_address(state)
        tls = core.config.gateway.tls is not None
        groups = scrape_targets(core.registry, address, via, socket.gethostname(), tls)
        conn.reply(Reply(200, json.dumps(groups).encode()))
        return
    denied = core.admin(request.api_key, request.authorization, path)
    if denied is not None:
        conn.reply(denied)
        return
    _overview(conn, state, request)


def _own_address(state: ServerState) -> str:
    gateway = state.core.config.gateway
    host = "127.0.0.1" if gateway.host in ("0.0.0.0", "::", "") else gateway.host
    return f"[{host}]:{gateway.port}" if ":" in host else f"{host}:{gateway.port}"


def _tails_wanted(core: Core) -> dict[str, tuple[Path, int]]:
    """The engines whose log tail the page shows now, and how many lines (overview.py)."""
    return {
        u.name: (u.spec.log_path, lines)
        for u in core.registry.all()
        if isinstance(u.spec, EngineSpec) and (lines := wants_tail(u))
    }


def _read_tails(wanted: dict[str, tuple[Path, int]]) -> dict[str, list[str]]:
    return {name: read_log_tail(path, lines) for name, (path, lines) in wanted.items()}


def _overview(conn: Answerer, state: ServerState, request: Request) -> None:
    core = state.core
    control = state.control

    async def answer() -> Reply:
        gpus = await _gpus.now()
        # The tails are read in a thread: an engine may change state meanwhile (starting
        # to failed), so read again until what was read is what its state wants; the
        # overview is then built at once, with no await between.
        for _ in range(3):
            wanted = _tails_wanted(core)
            read = await asyncio.to_thread(_read_tails, wanted)
            if _tails_wanted(core) == wanted:
                break
        readings = Readings(
            now=time.time(),
            node=socket.gethostname(),
            log_tails=read,
            gpus=gpus,
            actions={
                "reload": control is not None,
                "restart": control is not None,
                "load": core.demand is not None,
            },
        )
        return Reply(200, json.dumps(overview(core, readings)).encode())

    answer_later(conn, state, request, answer(), "the status page's overview failed")


def _restart(conn: Answerer, state: ServerState, request: Request, engine: str) -> None:
    control = state.control
    if control is None:
        conn.reply(
            error_reply(409, "this gateway runs no engines of its own to restart", "cannot_restart")
        )
        return

    async def answer() -> Reply:
        status, data = await control.restart(engine)
        return Reply(status, json.dumps(data).encode())

    answer_later(conn, state, request, answer(), "restart failed")


def _engine_metrics(conn: Answerer, state: ServerState, request: Request, engine: str) -> None:
    upstream = next(u for u in state.core.registry.all() if u.name == engine)
    spec = upstream.spec
    uds = spec.uds if isinstance(spec, EngineSpec) else None
    url = "http://localhost/metrics" if uds is not None else f"{upstream.url.rstrip('/')}/metrics"

    async def answer() -> Reply:
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=str(uds))
            if uds is not None
            else aiohttp.TCPConnector(force_close=True)
        )
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(url, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    return _unreadable(engine, f"its /metrics answered {resp.status}")
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(65536):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > METRICS_MAX_BYTES:
                        return _unreadable(engine, "its /metrics page is over 8 MB")
                kind = resp.headers.get("Content-Type", "text/plain; version=0.0.4")
                return Reply(200, b"".join(chunks), kind)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _unreadable(engine, str(exc) or f"no answer within {METRICS_TIMEOUT:g} s")

    answer_later(conn, state, request, answer(), "proxying an engine's metrics failed")


def _unreadable(engine: str, why: str) -> Reply:
    return error_reply(
        502,
        f"the metrics of engine {engine} could not be read: {why}; is it running? (`fleet status`)",
        "upstream_error",
    )
