"""The gateway in front of real fake-engine processes, spoken to by real clients.

Covers the three URL styles with the official `openai` SDK (OpenAI and AzureOpenAI), the
`model` rewrite, streaming relay, replica choice, cancellation, and every error the
gateway answers itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.registry import State
from vllm_fleet.testing.harness import FakeEngine, free_port

QWEN = "Qwen/Qwen2.5-1.5B-Instruct"
MISTRAL = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, FakeEngine]]:
    # Each engine serves exactly what the fleet would start it with (--served-model-name
    # MODEL ID ...), so a `model` the gateway failed to rewrite gets vLLM's 404.
    started = {
        "qwen": FakeEngine(QWEN, [QWEN, "qwen", "qwen2.5"], "--token-delay", "0.02").start(),
        "mistral": FakeEngine(MISTRAL, [MISTRAL, "mistral"]).start(),
        "r1": FakeEngine("org/rep", ["org/rep", "rep"], "--token-delay", "0.05").start(),
        "r2": FakeEngine("org/rep", ["org/rep", "rep"], "--token-delay", "0.05").start(),
    }
    yield started
    for engine in started.values():
        engine.stop()


@pytest.fixture(scope="module")
def gateway(engines: dict[str, FakeEngine]) -> Iterator[GatewayThread]:
    dead = free_port()  # nothing listens here
    fleet = f"""
gateway:
  max_body_mb: 0.01
deployments:
  qwen:
    model: {QWEN}
    aliases: [qwen2.5]
    endpoints: ["{engines["qwen"].url}"]
  mistral:
    model: {MISTRAL}
    endpoints: ["{engines["mistral"].url}"]
  rep:
    model: org/rep
    endpoints: ["{engines["r1"].url}", "{engines["r2"].url}"]
  down:
    model: org/down
    endpoints: ["http://127.0.0.1:{dead}"]
"""
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def stats(engine: FakeEngine, reset: bool = False) -> dict[str, Any]:
    query = "?reset=1" if reset else ""
    data: dict[str, Any] = httpx.get(f"{engine.url}/fake/stats{query}").json()
    return data


def engine_of(fingerprint: str | None, engines: dict[str, FakeEngine]) -> str:
    for name, engine in engines.items():
        if fingerprint == f"fake-{engine.port}":
            return name
    raise AssertionError(f"no engine has fingerprint {fingerprint}")


def assert_gateway_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["X-Fleet-Error"] == "gateway"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]
    return dict(error)


# ---------------------------------------------------------------- the three URL styles


def test_path_route_with_a_wrong_model_reaches_the_engine_with_its_own_name(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/qwen/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    assert engine_of(reply.system_fingerprint, engines) == "qwen"
    assert stats(engines["qwen"])["last_request"]["model"] == QWEN


def test_path_route_adds_model_when_the_client_sends_none(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    response = httpx.post(
        f"{gateway.url}/mistral/v1/completions", json={"prompt": "x", "max_tokens": 2}
    )
    assert response.status_code == 200
    assert stats(engines["mistral"])["last_request"]["model"] == MISTRAL


def test_azure_client_reaches_its_deployment(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        azure_deployment="mistral",
        api_version="2024-06-01",
        api_key="azure-key",
    )
    reply = client.chat.completions.create(
        model="whatever", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert engine_of(reply.system_fingerprint, engines) == "mistral"
    seen = stats(engines["mistral"])["last_request"]
    assert seen["path"] == "/v1/chat/completions"  # api-version is not forwarded
    assert seen["model"] == MISTRAL
    assert seen["headers"]["authorization"] == "Bearer azure-key"


def test_azure_embeddings(gateway: GatewayThread, engines: dict[str, FakeEngine]) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=gateway.url,
        azure_deployment="qwen",
        api_version="2024-06-01",
        api_key="k",
    )
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 384


@pytest.mark.parametrize(
    ("model", "engine"),
    [
        ("qwen", "qwen"),
        (QWEN, "qwen"),
        ("qwen2.5", "qwen"),
        ("mistral", "mistral"),
        (MISTRAL, "mistral"),
    ],
)
def test_plain_v1_routes_by_id_model_code_or_alias(
    gateway: GatewayThread, engines: dict[str, FakeEngine], model: str, engine: str
) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    reply = client.completions.create(model=model, prompt="hello", max_tokens=2)
    assert engine_of(reply.system_fingerprint, engines) == engine
    served = QWEN if engine == "qwen" else MISTRAL
    assert stats(engines[engine])["last_request"]["model"] == served


def test_models_lists_every_deployment_with_its_model_code(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused")
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"qwen", "mistral", "rep", "down"}
    assert listed["qwen"].model_extra is not None
    assert listed["qwen"].model_extra["root"] == QWEN


def test_deployment_models_is_the_engines_own_answer(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/qwen/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [QWEN, "qwen", "qwen2.5"]


def test_path_route_reaches_engine_health(gateway: GatewayThread) -> None:
    assert httpx.get(f"{gateway.url}/qwen/health").status_code == 200


# ---------------------------------------------------------------- streaming


def test_stream_through_the_sdk(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/qwen/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_stream_is_relayed_as_it_is_made_not_buffered(gateway: GatewayThread) -> None:
    body = {"prompt": "x", "max_tokens": 20, "stream": True}
    arrivals: list[float] = []
    lines: list[bytes] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{gateway.url}/qwen/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic() - start)
                lines.append(line.encode())
    assert lines[-1] == b"data: [DONE]"
    assert len(lines) >= 21
    # 20 tokens 20 ms apart: the first must arrive long before the last (a buffered
    # relay would deliver them all at the end).
    assert arrivals[0] < arrivals[-1] - 0.2


def test_client_disconnect_cancels_the_upstream_request(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    engine = engines["r1"]
    before = stats(engine)["aborted"]
    body = json.dumps({"model": "x", "prompt": "x", "max_tokens": 200, "stream": True}).encode()
    request = (
        b"POST /openai/deployments/rep/completions HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    # Two streams, so least-outstanding puts one on each replica; then hang up.
    socks = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(2)]
    for sock in socks:
        sock.sendall(request)
    for sock in socks:
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the stream early"
            received += chunk
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stats(engine)["aborted"] == before:
        time.sleep(0.05)
    assert stats(engine)["aborted"] == before + 1
    assert stats(engine)["in_flight"] == 0


# ---------------------------------------------------------------- replicas


def test_requests_spread_over_replicas_by_outstanding_requests(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    import concurrent.futures

    for name in ("r1", "r2"):
        stats(engines[name], reset=True)
    client = openai.OpenAI(base_url=f"{gateway.url}/rep/v1", api_key="unused")

    def one(_: int) -> str | None:
        reply = client.completions.create(model="rep", prompt="x", max_tokens=4)
        return reply.system_fingerprint

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answered = [engine_of(fp, engines) for fp in pool.map(one, range(4))]
    # Four concurrent slow requests: least-outstanding gives each replica two.
    assert sorted(answered) == ["r1", "r1", "r2", "r2"]


def test_a_replica_that_is_not_ready_gets_no_traffic(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    gateway.set_state("rep-1", State.STARTING)
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/rep/v1", api_key="unused")
        for _ in range(3):
            reply = client.completions.create(model="rep", prompt="x", max_tokens=1)
            assert engine_of(reply.system_fingerprint, engines) == "r1"
    finally:
        gateway.set_state("rep-1", State.READY)


# ---------------------------------------------------------------- errors


def test_unknown_deployment_is_404_listing_deployments(gateway: GatewayThread) -> None:
    response = httpx.post(f"{gateway.url}/llama/v1/chat/completions", json={})
    assert_gateway_error(response, 404, "llama", "qwen", "mistral")


def test_unknown_model_on_v1_is_404_through_the_sdk(gateway: GatewayThread) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert "gpt-4" in str(caught.value) and "qwen" in str(caught.value)


def test_loading_deployment_is_503_with_retry_after(gateway: GatewayThread) -> None:
    gateway.set_state("mistral-0", State.STARTING)
    try:
        response = httpx.post(f"{gateway.url}/mistral/v1/completions", json={"prompt": "x"})
        assert_gateway_error(response, 503, "mistral", "loading")
        assert int(response.headers["Retry-After"]) > 0
    finally:
        gateway.set_state("mistral-0", State.READY)


def test_failed_deployment_is_503_saying_why(gateway: GatewayThread) -> None:
    gateway.set_state("mistral-0", State.FAILED, "exited 1: gated repo, set HF_TOKEN")
    try:
        response = httpx.post(f"{gateway.url}/v1/completions", json={"model": "mistral"})
        assert_gateway_error(response, 503, "failed", "HF_TOKEN")
    finally:
        gateway.set_state("mistral-0", State.READY)


def test_engine_that_refuses_connections_is_503_with_retry_after(gateway: GatewayThread) -> None:
    response = httpx.post(f"{gateway.url}/down/v1/completions", json={"prompt": "x"})
    assert_gateway_error(response, 503, "down", "accepts connections")
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize(
    ("path", "content", "word"),
    [
        ("/qwen/v1/chat/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b"{not json", "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", "JSON object"),
        ("/qwen/v1/chat/completions", b'"just a string"', "JSON object"),
        ("/v1/chat/completions", b"\xff\xfe\x00garbage", "not valid JSON"),
        ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_bad_json_is_400(gateway: GatewayThread, path: str, content: bytes, word: str) -> None:
    response = httpx.post(
        f"{gateway.url}{path}", content=content, headers={"Content-Type": "application/json"}
    )
    assert_gateway_error(response, 400, word)


def test_body_over_the_limit_is_413(gateway: GatewayThread) -> None:
    big = {"model": "qwen", "prompt": "x" * 20_000}  # the fleet's limit is 0.01 MB
    response = httpx.post(f"{gateway.url}/v1/completions", json=big)
    assert_gateway_error(response, 413, "gateway.max_body_mb")


def test_v1_without_model_is_400(gateway: GatewayThread) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json={"messages": []})
    assert_gateway_error(response, 400, "model")


def test_engine_errors_pass_through_unchanged(
    gateway: GatewayThread, engines: dict[str, FakeEngine]
) -> None:
    body = {"prompt": "x", "max_tokens": -5}
    direct = httpx.post(f"{engines['qwen'].url}/v1/completions", json=body)
    via = httpx.post(f"{gateway.url}/qwen/v1/completions", json=body)
    assert direct.status_code == via.status_code == 400
    assert via.json() == direct.json()
    assert "X-Fleet-Error" not in via.headers


def test_hostile_requests_never_crash_the_gateway(gateway: GatewayThread) -> None:
    for path in ("/%00", "/..%2f..%2fetc/passwd", "/openai/deployments/", "/" + "a" * 4000):
        response = httpx.get(f"{gateway.url}{path}")
        assert response.status_code in (400, 404)
        assert "Traceback" not in response.text
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert b"Traceback" not in sock.recv(65536)
    assert httpx.get(f"{gateway.url}/health").status_code == 200


# ---------------------------------------------------------------- gateway endpoints


def test_health_and_status(gateway: GatewayThread) -> None:
    health = httpx.get(f"{gateway.url}/health").json()
    assert health["deployments"]["rep"] == {"ready": 2, "replicas": 2}
    status = httpx.get(f"{gateway.url}/fleet/status").json()
    ups = status["deployments"]["rep"]["upstreams"]
    assert [u["name"] for u in ups] == ["rep-0", "rep-1"]
    assert all(u["state"] == "ready" for u in ups)


def test_health_ready_query_is_503_until_every_deployment_is_ready(
    gateway: GatewayThread,
) -> None:
    assert httpx.get(f"{gateway.url}/health?ready=1").status_code == 200
    gateway.set_state("qwen-0", State.STARTING)
    try:
        assert httpx.get(f"{gateway.url}/health?ready=1").status_code == 503
    finally:
        gateway.set_state("qwen-0", State.READY)


def test_metrics_count_requests_by_deployment(gateway: GatewayThread) -> None:
    httpx.post(f"{gateway.url}/qwen/v1/completions", json={"prompt": "x", "max_tokens": 1})
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'fleet_requests_total{deployment="qwen",status="200",style="path"}' in text
    assert 'fleet_upstream_ready{deployment="rep",upstream="rep-0"} 1.0' in text


def test_engine_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    with FakeEngine("org/m", ["org/m"], "--token-delay", "0.05") as engine:
        gw = GatewayThread(
            f"deployments:\n  m:\n    model: org/m\n    endpoints: ['{engine.url}']\n"
        ).start()
        try:
            body = {"prompt": "x", "max_tokens": 200, "stream": True}
            lines: list[str] = []
            with httpx.stream("POST", f"{gw.url}/m/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 3:  # mid-stream: the engine dies
                        with contextlib.suppress(httpx.TransportError):
                            httpx.post(f"{engine.url}/fake/crash?status=0")
            assert response.status_code == 200
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2].removeprefix("data: "))["error"]
            assert error["code"] == "upstream_disconnected"
            assert "m-0" in error["message"]
        finally:
            gw.stop()


# ---------------------------------------------------------------- audio uploads (multipart)

AUDIO = bytes(range(256)) * 16  # 4 KB of "audio", every byte value, CRLFs and dashes too


@pytest.mark.parametrize(
    ("style", "model"),
    [("path", "whisper-1"), ("v1", "qwen2.5"), ("azure", "whisper-1")],
)
def test_an_audio_upload_reaches_the_engine_with_its_model_and_its_bytes_intact(
    gateway: GatewayThread, engines: dict[str, FakeEngine], style: str, model: str
) -> None:
    client: openai.OpenAI
    if style == "azure":
        client = openai.AzureOpenAI(
            azure_endpoint=gateway.url, azure_deployment="qwen", api_version="2024-06-01",
            api_key="k",
        )  # fmt: skip
    else:
        base = f"{gateway.url}/qwen/v1" if style == "path" else f"{gateway.url}/v1"
        client = openai.OpenAI(base_url=base, api_key="unused")
    result = client.audio.transcriptions.create(
        model=model, file=("talk.wav", AUDIO, "audio/wav"), language="en", temperature=0.5
    )
    assert result.text == f"{len(AUDIO)} bytes of talk.wav"
    seen = stats(engines["qwen"])["last_request"]
    assert seen["model"] == QWEN  # rewritten in the form, as in a JSON body
    assert seen["path"] == "/v1/audio/transcriptions"
    assert seen["body"]["language"] == "en" and seen["body"]["temperature"] == "0.5"
    assert seen["audio_sha256"] == hashlib.sha256(AUDIO).hexdigest()


def test_an_upload_to_v1_names_an_unknown_model_or_none(gateway: GatewayThread) -> None:
    files = {"file": ("a.wav", b"RIFF", "audio/wav")}
    unknown = httpx.post(
        f"{gateway.url}/v1/audio/transcriptions", data={"model": "nope"}, files=files
    )
    assert_gateway_error(unknown, 404, "nope")
    missing = httpx.post(f"{gateway.url}/v1/audio/transcriptions", files=files)
    assert_gateway_error(missing, 400)
    twice = httpx.post(
        f"{gateway.url}/qwen/v1/audio/transcriptions",
        data={"model": ["a", "b"]},
        files=files,
    )
    assert_gateway_error(twice, 400, "more than one `model` field")
