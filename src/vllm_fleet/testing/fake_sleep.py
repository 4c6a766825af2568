"""The fake engine's sleep mode, vLLM's dev-mode routes, the `vllm:engine_sleep_state`
gauge, and the GPU-memory ledger with the helpers tests read it with. Imports no `fake_vllm`.

Dev-mode routes (vLLM 0.32's `vllm/entrypoints/serve/dev/`: sleep, cache, rpc, server_info,
rlhf), present only when the environment has `VLLM_SERVER_DEV_MODE=1` (vLLM's
`bool(int(...))`; otherwise 404 like any unknown path); exactly `DEV_ROUTES`:
    POST /sleep?level=0|1|2&mode=abort|wait|keep    (defaults: level 1, mode abort)
    POST /wake_up[?tags=weights&tags=kv_cache]      (no tags: all)
    GET  /is_sleeping                               -> {"is_sleeping": bool}
    POST /release_kv_cache_memory, /reset_prefix_cache, /reset_mm_cache, /reset_encoder_cache,
         /collective_rpc, /pause, /resume, /abort_requests, /init_weight_transfer_engine,
         /start_weight_update, /start_draft_weight_update, /update_weights,
         /finish_weight_update, /update_weight_version, /weight_checker
    GET  /server_info, /is_paused, /weight_info, /get_world_size
Only the first three do anything; the others answer 200 with the body vLLM's route gives
(`/collective_rpc`: 400 without a JSON `method`) and change nothing.

Sleep (`--enable-sleep-mode`; without it `/sleep` and `/wake_up` answer 500 "Sleep mode is
not enabled in the model config", `/is_sleeping` false): `mode=abort` ends the requests in
flight first (a stream gets a last chunk with `finish_reason: "abort"` and `data: [DONE]`, a
non-streamed request a 503 error), `wait` lets them finish first, `keep` pauses them (no
token while asleep) until the wake. Then `--fake-sleep-delay` seconds (0.1) pass and the
answer comes: `{"status": "sleeping", "level": L}`. A wake takes `--fake-wake-delay` (0.1)
and answers `{"status": "awake" | "sleeping", "tags_woken": [...] | null}`; with tags only
those parts wake, and the engine is awake once both `weights` and `kv_cache` are. Sleeping
when asleep, or waking when awake, does nothing (as vLLM). From the start of a sleep to the
end of the wake, `GENERATION_PATHS` answer 503 (`ServiceUnavailableError`, "The engine is
sleeping"); `/health`, `/v1/models`, `/tokenize` keep answering. `/is_sleeping` is true from
the end of the sleep to the end of the full wake. Level 2 is modelled as level 1 (real vLLM
discards the weights and needs `/collective_rpc {"method": "reload_weights"}` after waking;
the fake's output is the same without it). `/metrics` (unless `--disable-log-stats`) gets
`vllm:engine_sleep_state{engine="0",model_name=...,sleep_state="awake|weights_offloaded|
discard_all"}` with vLLM's values: awake 1 while awake; asleep at level 1 or 2 the level's
state 1; at level 0 all three 0. `/fake/stats` adds `sleeping` (the level, 0 when awake),
`is_sleeping`, `sleep_state`, `sleeps`, `wakes` (full wakes) and `aborted_by_sleep`.

Ledger (`FAKE_VLLM_GPU_LEDGER=FILE`; format in `fake_vllm`'s docstring): `Ledger` writes it,
`read_ledger` reads it, `overlaps` finds two engines holding memory at once.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

# Every route vLLM adds with VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/serve/dev/: sleep,
# cache, rpc, server_info, rlhf), as (method, path). The fake answers all of them; only
# the sleep routes do anything.
DEV_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/release_kv_cache_memory"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"),
    ("POST", "/reset_encoder_cache"),
    ("POST", "/collective_rpc"),
    ("GET", "/server_info"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("GET", "/is_paused"),
    ("POST", "/abort_requests"),
    ("POST", "/init_weight_transfer_engine"),
    ("POST", "/start_weight_update"),
    ("POST", "/start_draft_weight_update"),
    ("POST", "/update_weights"),
    ("POST", "/finish_weight_update"),
    ("POST", "/update_weight_version"),
    ("GET", "/weight_info"),
    ("POST", "/weight_checker"),
    ("GET", "/get_world_size"),
)
# The paths a sleeping engine refuses with 503 (vLLM's docs/features/sleep_mode.md).
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
     "/v1/audio/transcriptions", "/v1/audio/translations"}
)  # fmt: skip
PARTS = ("weights", "kv_cache")  # what `/wake_up?tags=` can wake one at a time
MODES = ("abort", "wait", "keep")
LEDGER_ENV = "FAKE_VLLM_GPU_LEDGER"


def dev_mode(environ: Mapping[str, str] = os.environ) -> bool:
    """vLLM's `bool(int(VLLM_SERVER_DEV_MODE))` (a non-number counts as off)."""
    try:
        return int(environ.get("VLLM_SERVER_DEV_MODE", "0")) != 0
    except ValueError:
        return False


class Ledger:
    """Appends `<time> <who> hold|release` lines to a file shared by several processes,
    one `os.write` on an O_APPEND fd per line (atomic between them). A no-op without a
    path; `hold` and `release` only write when the state changes."""

    def __init__(self, path: str | None, who: str) -> None:
        self.who = who
        self.holding = False
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o644) if path else None

    def _write(self, event: str) -> None:
        if self.fd is not None:
            os.write(self.fd, f"{time.time():.6f} {self.who} {event}\n".encode())

    def hold(self) -> None:
        if not self.holding:
            self.holding = True
            self._write("hold")

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self._write("release")


def read_ledger(path: str | os.PathLike[str]) -> list[tuple[float, str, str]]:
    """The ledger's lines as (time, who, "hold" | "release"), in file order."""
    entries = []
    with open(path, encoding="utf-8") as ledger:
        for number, line in enumerate(ledger, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 3 or fields[2] not in ("hold", "release"):
                raise ValueError(f"{path}:{number}: not `<time> <who> hold|release`: {line!r}")
            entries.append((float(fields[0]), fields[1], fields[2]))
    return entries


def held(entries: Iterable[tuple[float, str, str]]) -> dict[str, list[tuple[float, float]]]:
    """Who held memory when: (from, to) spans; a hold never released lasts to math.inf."""
    since: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for at, who, event in sorted(entries, key=lambda entry: entry[0]):
        if event == "hold":
            since.setdefault(who, at)
        elif who in since:
            spans.setdefault(who, []).append((since.pop(who), at))
    for who, at in since.items():
        spans.setdefault(who, []).append((at, math.inf))
    return spans


def overlaps(entries: Iterable[tuple[float, str, str]]) -> list[str]:
    """Every time two different engines both held memory, earliest first, as
    "a@x and b@y both held from T1 to T2" (T2 "the end" when one never released)."""
    spans = held(entries)
    found: list[tuple[float, str]] = []
    names = sorted(spans)
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            for start_a, end_a in spans[first]:
                for start_b, end_b in spans[second]:
                    start, end = max(start_a, start_b), min(end_a, end_b)
                    if start < end:
                        until = "the end" if end == math.inf else f"{end:.6f}"
                        found.append(
                            (start, f"{first} and {second} both held from {start:.6f} to {until}")
                        )
    return [text for _, text in sorted(found)]


def signals_while_loading(ledger: Ledger) -> None:
    """Until the server replaces them: SIGTERM/SIGINT write the ledger's release, then kill
    the process as the signal's default action would (a loading engine just dies)."""
    loop = asyncio.get_running_loop()

    def die(sig: signal.Signals) -> None:
        ledger.release()
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, die, sig)


class Busy(Protocol):
    """What sleep mode reads from the engine: its names, where it is, requests in flight."""

    names: list[str]
    in_flight: int
    idle: asyncio.Event  # set while none is in flight

    @property
    def where(self) -> str: ...


class SleepAborted(Exception):
    """A request in flight when a `mode=abort` sleep began."""


class SleepMode:
    """The engine's sleep state. `state`: awake, falling_asleep, asleep (also while partly
    woken) or waking; `level`: the level it sleeps at, None while awake."""

    def __init__(
        self,
        enabled: bool = False,
        sleep_delay: float = 0.1,
        wake_delay: float = 0.1,
        ledger: Ledger | None = None,
    ) -> None:
        self.enabled = enabled
        self.sleep_delay = sleep_delay
        self.wake_delay = wake_delay
        self.ledger = ledger or Ledger(None, "")
        self.state = "awake"
        self.level: int | None = None
        self.asleep: set[str] = set()  # the parts not woken yet
        self.sleeps = 0
        self.wakes = 0
        self.aborts = 0  # bumped by each abort sleep: older tickets are aborted
        self.aborted = 0  # requests aborted by a sleep
        self.running = asyncio.Event()  # cleared while `mode=keep` requests are paused
        self.running.set()
        self.lock = asyncio.Lock()

    def ticket(self) -> int:
        """Taken by a request when it starts running; `gate` checks it."""
        return self.aborts

    async def gate(self, ticket: int) -> None:
        """Before each token: SleepAborted when an abort sleep began since `ticket`;
        waits while the engine sleeps after a `mode=keep` sleep."""
        if ticket < self.aborts:
            self.aborted += 1
            raise SleepAborted
        await self.running.wait()

    async def sleep(self, level: int, mode: str, busy: Busy) -> None:
        async with self.lock:
            if self.state != "awake":
                return  # vLLM: "Executor is already sleeping." and nothing else
            self.state = "falling_asleep"
            if mode == "keep":
                self.running.clear()
            elif busy.in_flight:
                if mode == "abort":
                    self.aborts += 1
                await busy.idle.wait()
            await asyncio.sleep(self.sleep_delay)
            if level >= 1:
                self.ledger.release()
            self.level, self.asleep, self.state = level, set(PARTS), "asleep"
            self.sleeps += 1

    async def wake_up(self, tags: list[str]) -> bool:
        """Wake the parts `tags` names (all without tags); True once fully awake."""
        async with self.lock:
            if self.level is None:
                return True  # vLLM: "Executor is not sleeping."
            waking = (set(tags) if tags else set(PARTS)) & self.asleep
            if waking:
                self.ledger.hold()  # a wake allocates from its start (no-op after level 0)
                if waking == self.asleep:
                    self.state = "waking"
                await asyncio.sleep(self.wake_delay)
                self.asleep -= waking
            if not self.asleep:
                self.level, self.state = None, "awake"
                self.running.set()
                self.wakes += 1
            return not self.asleep

    def stats(self) -> dict[str, Any]:
        return {
            "sleeping": self.level or 0,
            "is_sleeping": self.level is not None,
            "sleep_state": self.state,
            "sleeps": self.sleeps,
            "wakes": self.wakes,
            "aborted_by_sleep": self.aborted,
        }


class SleepStateGauge(Collector):
    """`vllm:engine_sleep_state`, as vLLM's PrometheusStatLogger exports it."""

    def __init__(self, mode: SleepMode, model_name: str) -> None:
        self.mode = mode
        self.model_name = model_name

    def collect(self) -> Any:
        gauge = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means "
            "sleep level 2.",
            labels=["engine", "model_name", "sleep_state"],
        )
        level = self.mode.level
        states = {
            "awake": level is None,
            "weights_offloaded": level == 1,
            "discard_all": level == 2,
        }
        for state, on in states.items():
            gauge.add_metric(["0", self.model_name, state], 1.0 if on else 0.0)
        yield gauge


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def sleeping_error() -> web.Response:
    return _error(
        503, "The engine is sleeping; wake it up first (POST /wake_up).", "ServiceUnavailableError"
    )


def aborted_error() -> web.Response:
    return _error(
        503, "Request aborted: the engine was put to sleep (mode=abort).", "ServiceUnavailableError"
    )


def sleep_gate(mode: SleepMode) -> Any:
    """A middleware: generation requests get 503 unless the engine is awake."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if mode.state != "awake" and request.path in GENERATION_PATHS:
            return sleeping_error()
        return await handler(request)

    return middleware


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fake-sleep-delay", type=float, default=0.1)
    parser.add_argument("--fake-wake-delay", type=float, default=0.1)


def start(args: argparse.Namespace, engine: Busy) -> SleepMode:
    """The engine's sleep mode from its flags, its ledger (`FAKE_VLLM_GPU_LEDGER`) holding
    from now on until the process exits, and the signal handlers for the loading time."""
    ledger = Ledger(os.environ.get(LEDGER_ENV), f"{engine.names[0]}@{engine.where}")
    signals_while_loading(ledger)  # first: a signal after the hold line finds them
    ledger.hold()
    atexit.register(ledger.release)  # also after an exception; not after os._exit
    return SleepMode(args.enable_sleep_mode, args.fake_sleep_delay, args.fake_wake_delay, ledger)


def install(
    app: web.Application,
    mode: SleepMode,
    busy: Busy,
    metrics: CollectorRegistry | None,
    clear_prefix_cache: Callable[[], None] = lambda: None,
) -> None:
    """Before the catch-all route: the 503 gate, the gauge (with sleep mode and stats on),
    and the dev routes (with VLLM_SERVER_DEV_MODE on). `clear_prefix_cache` is called by
    `POST /reset_prefix_cache` and by a sleep of level 1 or 2, as vLLM clears its cache."""
    app.middlewares.append(sleep_gate(mode))
    if mode.enabled and metrics is not None:
        metrics.register(SleepStateGauge(mode, busy.names[0]))
    if dev_mode():
        add_dev_routes(app, mode, busy, clear_prefix_cache)


def _not_enabled() -> web.Response:
    return _error(500, "Sleep mode is not enabled in the model config", "InternalServerError")


def add_dev_routes(
    app: web.Application, mode: SleepMode, busy: Busy, clear_prefix_cache: Callable[[], None]
) -> None:
    """Every route of DEV_ROUTES (call it only with VLLM_SERVER_DEV_MODE on)."""

    async def sleep(request: web.Request) -> web.Response:
        if not mode.enabled:
            return _not_enabled()
        level, how = request.query.get("level", "1"), request.query.get("mode", "abort")
        if level not in ("0", "1", "2") or how not in MODES:
            return _error(
                400, f"level must be 0, 1 or 2 and mode one of {MODES}", "BadRequestError"
            )
        await mode.sleep(int(level), how, busy)
        if level != "0":  # levels 1 and 2 free the KV cache, and its prefixes with it
            clear_prefix_cache()
        return web.json_response({"status": "sleeping", "level": int(level)})

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        clear_prefix_cache()
        return web.Response(status=200)  # vLLM's route answers an empty 200

    async def wake_up(request: web.Request) -> web.Response:
        if not mode.enabled:
            return _not_enabled()
        tags = request.query.getall("tags", [])
        if unknown := [tag for tag in tags if tag not in PARTS]:
            return _error(400, f"unknown tags {unknown}; known: {PARTS}", "BadRequestError")
        awake = await mode.wake_up(tags)
        return web.json_response(
            {"status": "awake" if awake else "sleeping", "tags_woken": tags or None}
        )

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": mode.level is not None})

    async def collective_rpc(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return _error(400, f"JSON decode error: {exc}", "BadRequestError")
        if not isinstance(body, dict) or body.get("method") is None:
            return _error(400, "Missing 'method' in request body", "BadRequestError")
        return web.json_response({"results": [None]})

    async def server_info(request: web.Request) -> web.Response:
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") and "KEY" not in k}
        return web.json_response({"vllm_config": "fake_vllm", "vllm_env": env, "system_env": {}})

    # The rest change nothing: 200 with the body vLLM's route answers with.
    bodies: dict[str, Any] = {
        "/release_kv_cache_memory": {"status": "kv_cache_released"},
        "/pause": {"status": "paused"},
        "/resume": {"status": "resumed"},
        "/is_paused": {"is_paused": False},
        "/abort_requests": {"status": "aborted", "aborted": 0},
        "/init_weight_transfer_engine": {"message": "Weight transfer initialized"},
        "/start_weight_update": {"message": "Weight update started"},
        "/start_draft_weight_update": {"message": "Draft weight update started"},
        "/update_weights": {"message": "Weights updated"},
        "/finish_weight_update": {"message": "Weight update finished"},
        "/update_weight_version": {"success": True},
        "/weight_info": {"weight_version": None},
        "/weight_checker": {"status": "checked"},
        "/get_world_size": {"world_size": 1},
    }

    async def harmless(request: web.Request) -> web.Response:
        if request.path in bodies:
            return web.json_response(bodies[request.path])
        return web.Response(status=200)  # the cache resets answer an empty 200

    special = {"/sleep": sleep, "/wake_up": wake_up, "/is_sleeping": is_sleeping,
               "/collective_rpc": collective_rpc, "/server_info": server_info,
               "/reset_prefix_cache": reset_prefix_cache}  # fmt: skip
    for method, path in DEV_ROUTES:
        app.router.add_route(method, path, special.get(path, harmless))
