"""The fake engine behaves like `vllm serve` (shared/notes/vllm-facts.md): real subprocess,
real HTTP clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator

import aiohttp
import pytest
from openai import NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from vllm_fleet.engines.vllm_metrics import EngineLoad, parse_load
from vllm_fleet.testing.fake_metrics import E2E_BUCKETS, TTFT_BUCKETS
from vllm_fleet.testing.harness import FakeEngine, fake_vllm_argv, free_port, port_open, wait_port

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(
        MODEL,
        ["smol", MODEL],
        *("--tokens", "5", "--enforce-eager", "--max-model-len", "4096"),
        *("--tokenizer-mode", "mistral", "--limit-mm-per-prompt", '{"image":10}'),
    ) as eng:
        yield eng


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    async def go() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    return asyncio.run(go())


def _post(url: str, data: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=data, headers=headers) as resp,
        ):
            return resp.status, await resp.read()

    return asyncio.run(go())


def test_unknown_model_gets_vllms_exact_404(engine: FakeEngine) -> None:
    status, body = _post(f"{engine.url}/v1/chat/completions", json.dumps({"model": "gpt-4"}))
    assert status == 404
    assert json.loads(body) == {
        "error": {
            "message": f"The model `gpt-4` does not exist. Valid aliases: smol, {MODEL}.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{engine.url}/v1", api_key="x").chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )


def test_served_names_and_missing_model_answer_as_first_name(engine: FakeEngine) -> None:
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.model == "smol"
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.system_fingerprint == f"fake-{engine.port}"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    status, body = _post(f"{engine.url}/v1/completions", json.dumps({"prompt": "a b c"}))
    assert status == 200
    completion = json.loads(body)
    assert completion["model"] == "smol"
    assert completion["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4"
    assert completion["usage"]["prompt_tokens"] == 3


def test_models_lists_one_card_per_served_name(engine: FakeEngine) -> None:
    status, headers, body = _get(f"{engine.url}/v1/models")
    assert status == 200
    assert headers["X-Fake-Engine"] == f"smol:{engine.port}"
    cards = json.loads(body)["data"]
    assert [c["id"] for c in cards] == ["smol", MODEL]
    assert all(c["root"] == MODEL and c["owned_by"] == "vllm" for c in cards)
    assert cards[0]["max_model_len"] == 4096


def test_health_and_unknown_route(engine: FakeEngine) -> None:
    status, _, body = _get(f"{engine.url}/health")
    assert (status, body) == (200, b"")
    status, _, body = _get(f"{engine.url}/nope")
    assert status == 404
    assert json.loads(body)["error"]["message"] == "Not Found"


def test_bad_json_is_400_in_vllms_envelope(engine: FakeEngine) -> None:
    status, body = _post(f"{engine.url}/v1/chat/completions", "{not json")
    assert status == 400
    error = json.loads(body)["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400


def test_stream_chunks_done_and_usage(engine: FakeEngine) -> None:
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="x")
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=3,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    # The raw wire format: `data: {json}\n\n` chunks ending with `data: [DONE]\n\n`.
    status, raw = _post(f"{engine.url}/v1/completions", json.dumps({"prompt": "x", "stream": True}))
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_embeddings_are_deterministic_floats_and_base64(engine: FakeEngine) -> None:
    client = OpenAI(base_url=f"{engine.url}/v1", api_key="x")
    one = client.embeddings.create(model="smol", input=["alpha", "beta"])  # base64 on the wire
    two = client.embeddings.create(model="smol", input="alpha", encoding_format="float")
    assert len(one.data) == 2 and len(one.data[0].embedding) == 384
    assert one.data[0].embedding == pytest.approx(two.data[0].embedding, rel=1e-6)
    assert one.data[0].embedding != one.data[1].embedding


def test_stats_record_the_last_request(engine: FakeEngine) -> None:
    _get(f"{engine.url}/fake/stats?reset=1")
    body = {"model": "smol", "messages": [], "max_tokens": 1}
    _post(
        f"{engine.url}/v1/chat/completions",
        json.dumps(body),
        {"X-Forwarded-For": "10.0.0.9", "Content-Type": "application/json"},
    )
    stats = json.loads(_get(f"{engine.url}/fake/stats")[2])
    assert stats["requests"] == 1 and stats["in_flight"] == 0
    last = stats["last_request"]
    assert last["path"] == "/v1/chat/completions" and last["model"] == "smol"
    assert last["body"] == body and last["headers"]["x-forwarded-for"] == "10.0.0.9"


def test_client_disconnect_aborts_the_stream() -> None:
    with FakeEngine(MODEL, [], "--token-delay", "0.05", "--tokens", "200") as eng:
        payload = json.dumps({"prompt": "x", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", eng.port)) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            stats = json.loads(_get(f"{eng.url}/fake/stats")[2])
            if stats["aborted"] == 1:
                break
            time.sleep(0.05)
        assert stats["aborted"] == 1 and stats["in_flight"] == 0


def test_api_key_protects_v1_only() -> None:
    with FakeEngine(MODEL, [], "--api-key", "sekret") as eng:
        status, _, body = _get(f"{eng.url}/v1/models")
        assert status == 401 and json.loads(body) == {"error": "Unauthorized"}
        assert _get(f"{eng.url}/health")[0] == 200
        client = OpenAI(base_url=f"{eng.url}/v1", api_key="sekret")
        assert client.models.list().data[0].id == MODEL


def test_skip_model_name_validation_accepts_any_model() -> None:
    env = {"VLLM_SKIP_MODEL_NAME_VALIDATION": "1", "CUDA_VISIBLE_DEVICES": "3,4"}
    with FakeEngine("ignored", ["m"], "--dtype", "bf16", "--model", MODEL, env=env) as eng:
        client = OpenAI(base_url=f"{eng.url}/v1", api_key="x")
        reply = client.completions.create(model="anything-at-all", prompt="hi")
        assert reply.model == "m"
        info = json.loads(_get(f"{eng.url}/fake/env")[2])
        assert info["CUDA_VISIBLE_DEVICES"] == "3,4" and info["served_names"] == ["m"]
        assert info["model"] == MODEL


def test_startup_delay_keeps_the_port_closed() -> None:
    eng = FakeEngine(MODEL, [], "--startup-delay", "1.5", wait=False).start()
    try:
        time.sleep(0.5)
        assert not port_open(eng.port)
        assert eng.proc is not None
        wait_port(eng.port, timeout=10, proc=eng.proc)
        assert _get(f"{eng.url}/health")[0] == 200
    finally:
        eng.stop()


def test_fail_start_prints_the_reason_and_exits_1() -> None:
    argv = fake_vllm_argv("meta-llama/Llama-3.1-8B-Instruct", free_port(), "--fail-start")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "gated repo" in done.stderr and "HF_TOKEN" in done.stderr


@pytest.mark.parametrize("status", [0, 3])
def test_crash_exits_with_the_asked_status(status: int) -> None:
    eng = FakeEngine(MODEL).start()
    try:
        with pytest.raises(aiohttp.ClientError):
            _post(f"{eng.url}/fake/crash?status={status}", b"")
        assert eng.proc is not None
        assert eng.proc.wait(10) == status
    finally:
        eng.stop()


def _load(eng: FakeEngine) -> EngineLoad:
    status, _, body = _get(f"{eng.url}/metrics")
    assert status == 200
    load = parse_load(body.decode())
    assert load is not None, body.decode()
    return load


def test_metrics_count_requests_and_tokens_as_vllm_names_them() -> None:
    with FakeEngine(MODEL, ["smol"], "--tokens", "5") as eng:
        client = OpenAI(base_url=f"{eng.url}/v1", api_key="x")
        client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "one two three"}]
        )
        client.embeddings.create(model="smol", input="four five")
        page = _get(f"{eng.url}/metrics")[2].decode()
        assert 'vllm:generation_tokens_total{engine="0",model_name="smol"} 5.0' in page
        assert "# TYPE vllm:num_requests_running gauge" in page
        assert _load(eng) == EngineLoad(
            running=0.0, waiting=0.0, generation_tokens=5.0, prompt_tokens=5.0
        )


def test_metrics_time_requests_in_vllms_histograms_and_count_them_by_finish_reason() -> None:
    with FakeEngine(MODEL, ["smol"], "--tokens", "4", "--token-delay", "0.02") as eng:
        page = _get(f"{eng.url}/metrics")[2].decode()
        # Exported before any request, as vLLM does: a dashboard has its series at once.
        assert (
            'vllm:request_success_total{engine="0",finished_reason="stop",model_name="smol"} 0.0'
            in page
        )
        assert 'vllm:time_to_first_token_seconds_count{engine="0",model_name="smol"} 0.0' in page
        client = OpenAI(base_url=f"{eng.url}/v1", api_key="x")
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "a"}])
        stream = client.completions.create(model="smol", prompt="b", max_tokens=2, stream=True)
        assert len([chunk for chunk in stream]) == 3  # 2 tokens, the finish
        families = {
            f.name: f
            for f in text_string_to_metric_families(_get(f"{eng.url}/metrics")[2].decode())
        }
    success = {
        s.labels["finished_reason"]: s.value
        for s in families["vllm:request_success"].samples
        if s.name.endswith("_total")
    }
    assert success == {"stop": 1.0, "length": 1.0, "abort": 0.0, "error": 0.0, "repetition": 0.0}
    for name, bounds in (
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:e2e_request_latency_seconds", E2E_BUCKETS),
    ):
        samples = {
            s.name.removeprefix(name): s for s in families[name].samples if "le" not in s.labels
        }
        assert samples["_count"].value == 2.0
        buckets = [s for s in families[name].samples if "le" in s.labels]
        assert [float(s.labels["le"]) for s in buckets] == [*bounds, float("inf")]
        assert buckets[-1].value == 2.0
    ttft = next(
        s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_sum")
    )
    e2e = next(
        s for s in families["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_sum")
    )
    # One token delay before the first token; four, then two, before the ends.
    assert 0.04 <= ttft.value < e2e.value
    assert e2e.value >= 0.12


def test_a_hung_engine_answers_health_but_computes_no_token() -> None:
    with FakeEngine(MODEL, ["smol"], "--token-delay", "0.02", "--tokens", "100000") as eng:

        async def go() -> None:
            body = json.dumps({"prompt": "x", "stream": True})
            async with aiohttp.ClientSession() as session:
                first = asyncio.ensure_future(session.post(f"{eng.url}/v1/completions", data=body))
                deadline = time.monotonic() + 10
                while (await asyncio.to_thread(_load, eng)).generation_tokens < 3:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                async with session.post(f"{eng.url}/fake/hang") as resp:
                    assert resp.status == 200
                frozen = await asyncio.to_thread(_load, eng)
                second = asyncio.ensure_future(session.post(f"{eng.url}/v1/completions", data=body))
                await asyncio.sleep(0.5)
                later = await asyncio.to_thread(_load, eng)
                assert later.generation_tokens == frozen.generation_tokens
                assert (later.running, later.waiting) == (1.0, 1.0)
                async with session.get(f"{eng.url}/health") as resp:
                    assert resp.status == 200
                assert not second.done()
                for task in (first, second):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        (await task).close()

        asyncio.run(go())


def test_disable_log_stats_leaves_metrics_without_vllms_own() -> None:
    with FakeEngine(MODEL, [], "--disable-log-stats") as eng:
        status, _, body = _get(f"{eng.url}/metrics")
        assert status == 200
        assert parse_load(body.decode()) is None
