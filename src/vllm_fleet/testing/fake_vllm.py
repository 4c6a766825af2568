"""A small server that behaves like `vllm serve`, for tests, benchmarks and demos.

    python -m vllm_fleet.testing.fake_vllm MODEL (--host H --port P | --uds PATH) \\
        --served-model-name NAME [NAME ...] [--startup-delay S] [--token-delay S] \\
        [--tokens N] [--fail-start] [--api-key KEY] [--max-model-len N] [--disable-log-stats] \\
        [--enable-sleep-mode [--fake-sleep-delay S] [--fake-wake-delay S]] [--enable-lora \\
        [--lora-modules NAME=PATH ...] [--max-loras N] [--max-lora-rank R] [--max-cpu-loras N]]

Unknown flags (vLLM's own) are ignored. Like vLLM (see shared/notes/vllm-facts.md): the
port (or socket: `--uds PATH` listens there and on no TCP port) stays closed while
"loading"; an unknown body `model` gets vLLM's exact 404 unless
`VLLM_SKIP_MODEL_NAME_VALIDATION=1`; responses name the first served name; SSE chunks end
with `data: [DONE]`; `--api-key` protects `/v1*` only. Generated text is deterministic
("tok0 tok1 ..."); `system_fingerprint` is `fake-<where>` and every response carries
`X-Fake-Engine: <first served name>:<where>`, so tests can tell which engine answered;
<where> is the port, or on a socket its file name without `.sock` (`qwen-0`). With
`--enable-request-id-headers`, as vLLM, it carries `X-Request-Id` too: the request's, or
a new uuid4 hex.
`/metrics` has vLLM's request gauges, token counters and request timings, named, labelled
and bucketed as vLLM 0.32 exports them (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:generation_tokens_total`, `vllm:prompt_tokens_total`,
`vllm:request_success_total`, `vllm:time_to_first_token_seconds`,
`vllm:e2e_request_latency_seconds`; see `fake_metrics.py`); `--disable-log-stats` turns
them off, as it does in vLLM.

Test hooks (`fake_hooks.py`): `GET /fake/stats` (counts, the last request as received;
`?reset=1` clears), `GET /fake/env` (pid, CUDA_VISIBLE_DEVICES, argv),
`POST /fake/crash?status=N` (exits N), `POST /fake/hang`: from then on the engine behaves
like vLLM with a deadlocked engine core (vLLM #39863): requests in flight stop getting
tokens and stay `running`, new ones wait (`waiting`) forever, while `/health` keeps
answering 200.

Sleep mode and vLLM's dev routes (`--enable-sleep-mode`, `VLLM_SERVER_DEV_MODE=1`): see
`fake_sleep.py`. GPU ledger, to prove engines never share a GPU: with `FAKE_VLLM_GPU_LEDGER=
FILE` each change appends a line (one `os.write` on an O_APPEND fd) `<time.time(), 6
decimals> <first served name>@<where> hold|release`: hold at process start (before
`--startup-delay`) and as a wake starts; release once a sleep of level 1 or 2 is done and at
exit (SIGTERM/SIGINT, `--fail-start`, `/fake/crash`; not SIGKILL). `fake_sleep.read_ledger`
reads it; `fake_sleep.overlaps` lists the times two engines both held memory.

LoRA (`--enable-lora`, `--lora-modules`, and with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1` the
load/unload routes): see `fake_lora.py`. A loaded adapter's name is a valid `model`, and the
adapter answers: `model` names it, each token carries its name ("bot:tok0 bot:tok1 ...").
`/v1/models` lists it after the base; `/fake/stats` adds adapters, lora_loads, lora_unloads.

Prefix cache, as vLLM's (see `fake_prefix.py`): tokens are a prompt's words (`/tokenize` gives
their ids); full blocks of `FAKE_VLLM_BLOCK_TOKENS` (16) are cached under chained keys, LRU,
`FAKE_VLLM_PREFIX_BLOCKS` (4096; 0: off) at most. With `FAKE_VLLM_PREFILL_US_PER_TOKEN` (0) a
request waits that many microseconds per token missed, one prefill at a time, as `waiting`.
`/metrics` adds `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total` and
`vllm:kv_cache_usage_perc`; `/fake/stats` adds `prefix`; a sleep (level 1, 2) or the dev route
`POST /reset_prefix_cache` empties the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import signal
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from vllm_fleet.testing import fake_hooks, fake_lora, fake_prefix, fake_sleep
from vllm_fleet.testing.fake_metrics import METRICS, RequestTimes, VllmStats, metrics
from vllm_fleet.testing.fake_sleep import SleepAborted, SleepMode

EMBED_DIMS = 384
# Request headers /fake/stats reports, so tests can see what a proxy forwarded.
_SEEN_HEADERS = (
    "host", "authorization", "api-key", "content-type", "user-agent", "x-request-id",
    "x-real-ip", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "connection",
    "traceparent", "tracestate",
)  # fmt: skip


@dataclass
class Engine:
    model: str
    names: list[str]
    port: int
    token_delay: float
    tokens: int
    max_model_len: int
    api_key: str | None
    any_model: bool
    requests: int = 0
    aborted: int = 0
    in_flight: int = 0
    last_request: dict[str, Any] | None = None
    counter: int = 0
    argv: list[str] = field(default_factory=list)
    # The connections of requests being answered, aborted on SIGTERM (as vLLM aborts them).
    answering: set[asyncio.Transport] = field(default_factory=set)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while none in flight
    log_stats: bool = True  # False: --disable-log-stats, no vllm: metrics
    waiting: int = 0  # requests that arrived after /fake/hang
    hung: bool = False
    generation_tokens: int = 0
    prompt_tokens: int = 0
    started: float = field(default_factory=time.time)
    times: RequestTimes = field(default_factory=RequestTimes)
    sleep: SleepMode = field(default_factory=SleepMode)
    loras: fake_lora.Loras = field(default_factory=fake_lora.Loras)
    prefix: fake_prefix.Prefix = field(default_factory=fake_prefix.Prefix.from_env)
    uds: str | None = None
    request_id_headers: bool = False  # --enable-request-id-headers: answers echo X-Request-Id

    @property
    def where(self) -> str:
        """The port, or the socket's file name without `.sock`: which engine this is."""
        return os.path.basename(self.uds).removesuffix(".sock") if self.uds else str(self.port)

    @property
    def fingerprint(self) -> str:
        return f"fake-{self.where}"


ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status)


def _bad_request(message: str) -> web.Response:
    return _error(400, message, "BadRequestError")


def _prompt_tokens(value: Any) -> int:
    """A deterministic stand-in for tokenization: whitespace-separated words."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_prompt_tokens(v) for v in value)
    if isinstance(value, dict):
        return _prompt_tokens(value.get("content", "")) + _prompt_tokens(value.get("text", ""))
    return 1 if isinstance(value, int) else 0


def _token(index: int, adapter: str | None = None) -> str:
    """The text of token `index`; an adapter's tokens carry its name (`bot:tok0 bot:tok1`)."""
    return f"{' ' if index else ''}{adapter + ':' if adapter else ''}tok{index}"


def _embedding(text: str) -> list[float]:
    raw = b""
    seed = text.encode()
    while len(raw) < EMBED_DIMS:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    values = [(b - 127.5) / 127.5 for b in raw[:EMBED_DIMS]]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    engine = request.app[ENGINE]
    authorized = request.headers.get("Authorization", "") == f"Bearer {engine.api_key}"
    if engine.api_key and request.path.startswith("/v1") and not authorized:
        return web.json_response({"error": "Unauthorized"}, status=401)
    response: web.StreamResponse = await handler(request)
    return response


async def _engine_header(request: web.Request, response: web.StreamResponse) -> None:
    engine = request.app[ENGINE]
    response.headers["X-Fake-Engine"] = f"{engine.names[0]}:{engine.where}"
    if engine.request_id_headers:  # as vLLM's XRequestIdMiddleware
        response.headers["X-Request-Id"] = request.headers.get("X-Request-Id", uuid.uuid4().hex)


def _unknown_model(engine: Engine, model: object) -> web.Response | None:
    """vLLM's 404 for a `model` the engine does not serve (None when it does)."""
    if model is None or model in engine.names or engine.any_model or engine.loras.adapter(model):
        return None
    return _error(
        404,
        f"The model `{model}` does not exist. Valid aliases: {', '.join(engine.names)}.",
        "NotFoundError",
        "model",
    )


def _record(request: web.Request, body: dict[str, Any], **extra: Any) -> Engine:
    """Count the request and keep it as received, for /fake/stats; the engine."""
    engine = request.app[ENGINE]
    engine.requests += 1
    headers = {k: request.headers[k] for k in _SEEN_HEADERS if k in request.headers}
    engine.last_request = {"path": request.path_qs, "model": body.get("model"),
                           "headers": headers, "body": body, **extra}  # fmt: skip
    return engine


async def _parse(request: web.Request) -> dict[str, Any] | web.Response:
    """The JSON body and vLLM's model check; a Response when the request is refused."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        return _bad_request(f"Invalid JSON body: {exc}")
    if not isinstance(body, dict):
        return _bad_request("The request body must be a JSON object")
    engine = _record(request, body)
    if (refused := _unknown_model(engine, body.get("model"))) is not None:
        return refused
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or max_tokens < 1 or max_tokens > engine.max_model_len
    ):
        return _bad_request(
            f"max_tokens must be an integer between 1 and {engine.max_model_len}; "
            f"got {max_tokens!r}"
        )
    return body


def _disconnected(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _stuck_if_hung(engine: Engine) -> None:
    """Never return once /fake/hang was called (until the client goes away)."""
    if engine.hung:
        await asyncio.get_running_loop().create_future()  # never set


async def _next_token(
    engine: Engine, ticket: int, seq: fake_prefix.InFlight, arrival: float
) -> None:
    """Wait for the next token to be computed, and count it (or SleepAborted)."""
    if engine.token_delay:
        await asyncio.sleep(engine.token_delay)
    await _stuck_if_hung(engine)
    await engine.sleep.gate(ticket)
    engine.generation_tokens += 1
    seq.generated += 1
    if seq.generated == 1:
        engine.times.first_token(arrival)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    parsed = await _parse(request)
    if isinstance(parsed, web.Response):
        return parsed
    body = parsed
    arrival = time.monotonic()  # vLLM's arrival time: TTFT and e2e latency count from here
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    count = limit if isinstance(limit, int) else engine.tokens
    finish = "length" if isinstance(limit, int) else "stop"
    prompt = _prompt_tokens(body.get("messages") if chat else body.get("prompt"))
    usage = {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}
    engine.counter += 1
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{engine.where}-{engine.counter}"
    adapter = engine.loras.adapter(body.get("model"))
    head = {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": adapter or engine.names[0],
        "system_fingerprint": engine.fingerprint,
    }
    if engine.hung:  # a deadlocked engine core never schedules it
        engine.waiting += 1
        try:
            await _stuck_if_hung(engine)
        finally:
            engine.waiting -= 1
    seq = await engine.prefix.prefill(fake_prefix.prompt_ids(body, chat), engine)
    engine.in_flight += 1
    engine.idle.clear()
    ticket = engine.sleep.ticket()
    if (transport := request.transport) is not None:
        engine.answering.add(transport)
    engine.prompt_tokens += prompt
    try:
        if body.get("stream"):
            return await _stream(
                request, engine, head, chat, count, finish, usage, body, ticket, seq, arrival
            )
        try:
            for _ in range(count):
                await _next_token(engine, ticket, seq, arrival)
                if _disconnected(request):
                    raise asyncio.CancelledError
        except SleepAborted:
            engine.times.finish("abort", arrival)
            return fake_sleep.aborted_error()
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (handler_cancellation).
            engine.aborted += 1
            raise
        engine.times.finish(finish, arrival)
        text = "".join(_token(i, adapter) for i in range(count))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
            head["object"] = "chat.completion"
        else:
            choice["text"] = text
        return web.json_response({**head, "choices": [choice], "usage": usage})
    finally:
        engine.prefix.release(seq)
        engine.in_flight -= 1
        engine.answering.discard(transport)
        if not engine.in_flight:
            engine.idle.set()


async def _stream(
    request: web.Request,
    engine: Engine,
    head: dict[str, Any],
    chat: bool,
    count: int,
    finish: str,
    usage: dict[str, int],
    body: dict[str, Any],
    ticket: int,
    seq: fake_prefix.InFlight,
    arrival: float,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    # Every token chunk is the same JSON around the token text: build it once.
    if chat:
        template = {**head, "choices": [{"index": 0, "delta": {"content": "\x00"}}]}
    else:
        template = {**head, "choices": [{"index": 0, "text": "\x00"}]}
    template["choices"][0].update(logprobs=None, finish_reason=None)
    before, after = ("data: " + json.dumps(template) + "\n\n").encode().split(b'"\\u0000"')
    options = body.get("stream_options") or {}
    adapter = engine.loras.adapter(body.get("model"))
    try:
        if chat:
            first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}  # fmt: skip
            await response.write(b"data: " + json.dumps(first).encode() + b"\n\n")
        try:
            for index in range(count):
                await _next_token(engine, ticket, seq, arrival)
                if _disconnected(request):
                    raise ConnectionResetError
                await response.write(before + json.dumps(_token(index, adapter)).encode() + after)
        except SleepAborted:  # vLLM ends an aborted stream with finish_reason "abort"
            finish, options = "abort", {}
        engine.times.finish(finish, arrival)
        last_choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        last_choice["delta" if chat else "text"] = {} if chat else ""
        chunks = [{**head, "choices": [last_choice]}]
        if isinstance(options, dict) and options.get("include_usage"):
            chunks.append({**head, "choices": [], "usage": usage})
        data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
        await response.write(data + b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        engine.aborted += 1
        raise
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    """`/v1/audio/transcriptions` (and translations): a multipart upload whose `model`
    field vLLM checks like a JSON body's; the answer says what was received."""
    try:
        fields = await request.post()
    except ValueError as exc:
        return _bad_request(f"Invalid form body: {exc}")
    upload = fields.get("file")
    if not isinstance(upload, web.FileField):
        return _bad_request("`file` (the audio) is required")
    audio = upload.file.read()
    seen = {k: v for k, v in fields.items() if isinstance(v, str)}
    upload_seen = {"filename": upload.filename, "bytes": len(audio)}
    sha256 = hashlib.sha256(audio).hexdigest()
    engine = _record(request, {**seen, "file": upload_seen}, audio_sha256=sha256)
    if (refused := _unknown_model(engine, seen.get("model"))) is not None:
        return refused
    return web.json_response({"text": f"{len(audio)} bytes of {upload.filename}"})


async def embeddings(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    parsed = await _parse(request)
    if isinstance(parsed, web.Response):
        return parsed
    raw = parsed.get("input")
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if not isinstance(inputs, list) or not inputs:
        return _bad_request("`input` must be a string or a non-empty list")
    base64_out = parsed.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = _embedding(json.dumps(item))
        value: Any = vector
        if base64_out:
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": value})
    prompt = _prompt_tokens(inputs)
    engine.prompt_tokens += prompt
    engine.counter += 1
    return web.json_response(
        {
            "id": f"embd-{engine.where}-{engine.counter}",
            "object": "list",
            "created": int(time.time()),
            "model": engine.loras.adapter(parsed.get("model")) or engine.names[0],
            "data": data,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    cards = [fake_lora.card(n, engine.model, None, engine.max_model_len) for n in engine.names]
    return web.json_response({"object": "list", "data": cards + engine.loras.cards()})


async def tokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    parsed = await _parse(request)
    if isinstance(parsed, web.Response):
        return parsed
    ids = fake_prefix.prompt_ids(parsed, chat="prompt" not in parsed)  # the prefix cache's
    return web.json_response(
        {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.0.0+fake"})


async def not_found(request: web.Request) -> web.Response:
    return _error(404, "Not Found", "Not Found")


def create_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[_auth], client_max_size=64 * 1024 * 1024)
    app[ENGINE] = engine
    app[METRICS] = CollectorRegistry(auto_describe=True)
    if engine.log_stats:
        app[METRICS].register(VllmStats(engine))
    app.on_response_prepare.append(_engine_header)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", transcriptions)
    app.router.add_post("/tokenize", tokenize)
    fake_hooks.install(app, engine)
    registry = app[METRICS] if engine.log_stats else None
    fake_sleep.install(app, engine.sleep, engine, registry, engine.prefix.clear)
    fake_lora.install(app, engine.loras)
    fake_prefix.install(engine.prefix, engine.names[0], registry)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fake_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("model_tag", nargs="?", help="the model (as `vllm serve MODEL`)")
    parser.add_argument("--model", dest="model_flag")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--uds", default=None, help="listen on this Unix socket, not on TCP")
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--fail-start", action="store_true")
    # As vLLM's (0.18+, default 0): on SIGTERM, requests in flight get this long, then abort.
    parser.add_argument("--shutdown-timeout", type=float, default=0.0)
    parser.add_argument("--disable-log-stats", action="store_true")
    parser.add_argument("--enable-request-id-headers", action="store_true")
    fake_sleep.add_flags(parser)
    fake_lora.add_flags(parser)
    args, _unknown = parser.parse_known_args(argv)
    # `--model M` wins: a stray value of an unknown flag may land in the positional slot.
    args.model = args.model_flag or args.model_tag
    if not args.model:
        parser.error("give the model: fake_vllm MODEL or --model MODEL")
    return args


async def serve(args: argparse.Namespace, argv: list[str]) -> int:
    engine = Engine(
        model=args.model,
        names=list(args.served_model_name or [args.model]),
        port=args.port,
        token_delay=args.token_delay,
        tokens=args.tokens,
        max_model_len=args.max_model_len,
        api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None,
        any_model=os.environ.get("VLLM_SKIP_MODEL_NAME_VALIDATION", "") not in ("", "0"),
        argv=argv,
        log_stats=not args.disable_log_stats,
        uds=args.uds,
        request_id_headers=args.enable_request_id_headers,
    )
    engine.sleep = fake_sleep.start(args, engine)  # holds the GPU (as loading does) until exit
    if args.startup_delay:
        await asyncio.sleep(args.startup_delay)  # "loading": the port stays closed
    if args.fail_start:
        print(
            "OSError: You are trying to access a gated repo.\nMake sure to have access to it "
            f"at https://huggingface.co/{args.model}.\n401 Client Error. (fake_vllm "
            "--fail-start) Set HF_TOKEN or run `hf auth login`.",
            file=sys.stderr,
            flush=True,
        )
        return 1
    try:  # as vLLM: the --lora-modules load once the model has, before the port opens
        engine.loras = fake_lora.start(args, engine.names)
    except ValueError as exc:
        print(f"ValueError: {exc}", file=sys.stderr, flush=True)
        return 1
    runner = web.AppRunner(create_app(engine), access_log=None, handler_cancellation=True)
    await runner.setup()
    site: web.BaseSite
    if args.uds:
        site = web.UnixSite(runner, args.uds)
        where = f"unix:{args.uds}"
    else:
        site = web.TCPSite(runner, args.host, args.port, reuse_address=True)
        where = f"http://{args.host}:{args.port}"
    await site.start()
    print(f"fake_vllm: serving {engine.names} on {where}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # vLLM on SIGTERM: requests in flight get --shutdown-timeout seconds, then are aborted
    # (aiohttp's own cleanup would wait for them).
    if engine.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.idle.wait(), args.shutdown_timeout)
    for transport in list(engine.answering):
        transport.abort()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(args, argv))
    return uvloop.run(serve(args, argv))


if __name__ == "__main__":
    sys.exit(main())
