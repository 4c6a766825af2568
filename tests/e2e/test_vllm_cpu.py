"""End to end on real vLLM: `fleet up examples/cpu-demo.yaml` with the CPU build of vLLM
and two real models (SmolLM2-135M-Instruct for chat, all-MiniLM-L6-v2 for embeddings),
talked to through the gateway with the official `openai` package.

One fleet is started for the whole module (about a minute to ready on 2 cores) and
stopped with SIGTERM at the end, which must leave no engine process behind. The restart
test kills the chat engine, so it runs last.

Needs `make engines-env models` (`make test` runs both first). Without them the tests
skip and say why; with FLEET_E2E_REQUIRED=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai import AzureOpenAI, OpenAI

from tests.conftest import free_port, group_members, wait_until
from tests.test_page_browser import browser as browser  # the fixture

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DEMO_FILE = REPO / "examples" / "cpu-demo.yaml"
ENGINE_PYTHON = Path(os.environ.get("FLEET_ENGINE_PYTHON") or REPO / ".venv-vllm/bin/python")
MODELS = Path(os.environ.get("FLEET_MODELS") or REPO / ".cache" / "models")
# Written by scripts/prepare_demo_models.py into a folder once it is complete.
PREPARED = ".fleet-prepared"
READY_TIMEOUT = 480.0  # both engines load in about a minute here; slow CI gets room
MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


def _missing_prerequisites() -> list[str]:
    missing = []
    if not ENGINE_PYTHON.is_file():
        missing.append(f"no engines' python at {ENGINE_PYTHON} (run `make engines-env`)")
    for folder in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        if not (MODELS / folder / PREPARED).is_file():
            missing.append(f"model folder {MODELS / folder} is not prepared (run `make models`)")
    return missing


def http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library: status, headers, body (errors included)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if api_key is not None:
        request.add_header("Authorization", f"Bearer {api_key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def two_server_ports() -> int:
    """The first of two consecutive ports a server can listen on (the demo's engines take
    FLEET_BASE_PORT and the next). Checked as servers bind (vLLM's uvicorn included), with
    SO_REUSEADDR: after a busy test run thousands of loopback ports sit in TIME_WAIT, which
    blocks a plain bind but not a server's."""
    for _ in range(200):
        # Above the engines' default VLLM_PORT ranges (20000, 100 ports per engine: the
        # fleet refuses a base_port inside them), below Linux's ephemeral range (32768+).
        first = random.randrange(21000, 32000)
        try:
            with contextlib.ExitStack() as stack:
                for port in (first, first + 1):
                    sock = stack.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
        except OSError:
            continue
        return first
    raise RuntimeError("found no two consecutive free ports in 21000-32000")


@dataclass
class Fleet:
    base: str
    proc: subprocess.Popen[bytes]
    output: Path
    engine_groups: set[int] = field(default_factory=set)
    api_key: str | None = None  # an admin key, for a fleet file with keys

    def status(self) -> dict[str, Any]:
        code, _, body = http("GET", f"{self.base}/fleet/status", timeout=10, api_key=self.api_key)
        assert code == 200, body
        data: dict[str, Any] = json.loads(body)
        for upstream in self.upstreams(data):
            if upstream.get("pid"):
                # Engines lead their own process group (pgid == pid): remember every one
                # seen, so teardown can prove none of them outlived `fleet up`.
                self.engine_groups.add(int(upstream["pid"]))
        return data

    @staticmethod
    def upstreams(status: dict[str, Any]) -> list[dict[str, Any]]:
        return [u for dep in status["deployments"].values() for u in dep["upstreams"]]

    def upstream(self, dep_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.status()["deployments"][dep_id]["upstreams"][0]
        return found

    def all_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"`fleet up` exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            ups = self.upstreams(self.status())
        except (OSError, AssertionError):
            return False  # the gateway is not listening yet
        failed = [u["name"] for u in ups if u["state"] == "failed"]
        if failed:
            raise AssertionError(f"engines failed to start: {failed}\n{self.tail()}")
        return bool(ups) and all(u["state"] == "ready" for u in ups)

    def tail(self, chars: int = 4000) -> str:
        text = self.output.read_text(errors="replace")[-chars:]
        logs = sorted((self.output.parent / "logs").glob("*.log"))
        for log in logs:
            text += f"\n--- {log}\n" + log.read_text(errors="replace")[-chars:]
        return text


def require_prerequisites() -> None:
    """Skip, saying why, when the engines' python or the demo models are missing; fail
    instead with FLEET_E2E_REQUIRED=1 (CI, where a missing piece is a broken build)."""
    missing = _missing_prerequisites()
    if missing:
        reason = "real-vLLM e2e needs the CPU build and the demo models: " + "; ".join(missing)
        if os.environ.get("FLEET_E2E_REQUIRED") == "1":
            pytest.fail(reason + " (FLEET_E2E_REQUIRED=1)")
        pytest.skip(reason)


def demo_env(workdir: Path, engine_port: int) -> dict[str, str]:
    """The environment the demo file reads: the engines' python, the models, the ports."""
    env = os.environ | {
        "FLEET_ENGINE_PYTHON": str(ENGINE_PYTHON),
        "FLEET_MODELS": str(MODELS),
        "FLEET_BASE_PORT": str(engine_port),
        "FLEET_LOG_DIR": str(workdir / "logs"),
    }
    if (os.cpu_count() or 1) < 2:  # the demo binds chat to CPU 0 and embed to CPU 1
        env |= {"FLEET_CHAT_CPUS": "auto", "FLEET_EMBED_CPUS": "auto"}
    return env


def start_fleet(
    path: Path, workdir: Path, api_key: str | None = None
) -> tuple[Fleet, dict[str, str]]:
    """`fleet up path` on free ports, ready; and the environment it runs with (`api_key`:
    an admin key of the file, for its status). The caller stops it with `_stop`."""
    engine_port = two_server_ports()
    port = wait_until(lambda: (p := free_port()) not in (engine_port, engine_port + 1) and p)
    env = demo_env(workdir, engine_port)
    output = workdir / "fleet-up.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_fleet.cli", "up", str(path), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Fleet(base=f"http://127.0.0.1:{port}", proc=proc, output=output, api_key=api_key)
    try:
        wait_until(running.all_ready, timeout=READY_TIMEOUT, interval=1.0, what="ready")
    except BaseException as exc:
        tail = running.tail()
        with contextlib.suppress(AssertionError):
            _stop(running)  # no engine left behind; its own complaints come second
        if isinstance(exc, TimeoutError):
            pytest.fail(f"engines not ready within {READY_TIMEOUT:.0f}s:\n{tail}")
        raise
    return running, env


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require_prerequisites()
    running, _ = start_fleet(DEMO_FILE, tmp_path_factory.mktemp("fleet"))
    try:
        yield running
    finally:
        _stop(running)


def _stop(running: Fleet) -> None:
    """SIGTERM `fleet up`; it must exit 0 and leave no engine process behind."""
    proc = running.proc
    if proc.poll() is None:
        with contextlib.suppress(OSError, AssertionError):
            running.status()  # a last look at the pids, for the orphan check below
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        for pgid in running.engine_groups:
            for pid in group_members(pgid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(
            f"`fleet up` did not stop within 90s of SIGTERM:\n{running.tail()}"
        ) from exc
    left = {pgid: group_members(pgid) for pgid in running.engine_groups}
    left = {pgid: pids for pgid, pids in left.items() if pids}
    for pids in left.values():
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"engine processes outlived `fleet up` (group: pids): {left}"
    assert code == 0, f"`fleet up` exited {code} after SIGTERM:\n{running.tail()}"


# What the demo file serves the chat model as (`served_name`), whatever clients send.
CHAT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------- the tests


def _answer(reply: Any, max_tokens: int) -> str:
    """What every greedy chat reply from a real model must satisfy, on any machine: a
    non-empty answer, the served name as `model`, and `usage` that adds up."""
    text: str = reply.choices[0].message.content or ""
    assert text.strip(), f"the engine answered nothing: {reply}"
    assert reply.model == CHAT_NAME
    usage = reply.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    return text


def test_chat_with_a_wrong_model_via_the_path_route(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=40, temperature=0
    )
    _answer(reply, 40)


def test_chat_via_the_azure_route(fleet: Fleet) -> None:
    client = AzureOpenAI(
        azure_endpoint=fleet.base,
        azure_deployment="chat",
        api_version="2024-06-01",
        api_key="unused",
    )
    reply = client.chat.completions.create(
        model="not-a-model-anyone-serves", messages=MESSAGES, max_tokens=40, temperature=0
    )
    _answer(reply, 40)


def test_a_greedy_request_gets_the_same_answer_twice(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    messages: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
    first, second = (
        _answer(
            client.chat.completions.create(
                model="x", messages=messages, max_tokens=30, temperature=0
            ),
            30,
        )
        for _ in range(2)
    )
    assert first == second


def test_the_chat_model_knows_the_capital_of_france(fleet: Fleet) -> None:
    """The one check of what the answer says: it caught vLLM's CPU bfloat16 kernels
    answering nonsense on some CPUs (the demo runs float32 since)."""
    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=40, temperature=0
    )
    text = _answer(reply, 40)
    assert "Paris" in text, (
        f"the demo model's greedy answer to {MESSAGES[0]['content']!r} was {text!r}. Its "
        "wording can drift with the CPU's kernels (instruction sets, dtype), but SmolLM2 in "
        "float32 names Paris; if test_vllm_answers_as_transformers_does fails too, vLLM's "
        "numerics are wrong on this machine (check the engine's --dtype)"
    )


def test_vllm_answers_as_transformers_does(fleet: Fleet) -> None:
    """vLLM's greedy answer equals transformers' own greedy answer for the same model,
    prompt and dtype on this machine: a numerically broken engine path (as vLLM's CPU
    bfloat16 kernels were on a Xeon with AMX) is named as such here."""
    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    for messages, max_tokens in REFERENCE_CHATS:
        reference = _transformers_answer(messages, max_tokens)
        reply = client.chat.completions.create(
            model="x", messages=messages, max_tokens=max_tokens, temperature=0
        )
        text = _answer(reply, max_tokens)
        assert text.strip() == reference["text"].strip(), (
            f"vLLM and transformers disagree on the greedy answer to {messages!r} in "
            f"{REFERENCE_DTYPE} on this machine:\n  vLLM:         {text!r}\n  transformers: "
            f"{reference['text']!r}\nvLLM's kernels compute something else than the model "
            "(a numerically broken engine path): check the engine's --dtype in "
            "examples/cpu-demo.yaml"
        )
        assert reply.usage.prompt_tokens == reference["prompt_tokens"]


# Chats whose greedy answers are compared with transformers', and at what length.
REFERENCE_CHATS: list[tuple[list[Any], int]] = [
    (MESSAGES, 24),
    ([{"role": "user", "content": "Write one sentence about the sea."}], 24),
]
# The dtype examples/cpu-demo.yaml runs the chat engine in (`--dtype float32`).
REFERENCE_DTYPE = "float32"


def _transformers_answer(messages: list[Any], max_tokens: int) -> dict[str, Any]:
    """transformers' greedy answer, from the engines' python (tests/e2e/reference_answer.py)."""
    script = Path(__file__).with_name("reference_answer.py")
    model = MODELS / "smollm2-135m-instruct"
    done = subprocess.run(
        [str(ENGINE_PYTHON), str(script), str(model), str(max_tokens), REFERENCE_DTYPE],
        input=json.dumps(messages),
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
    )
    assert done.returncode == 0, f"reference_answer.py failed:\n{done.stderr[-3000:]}"
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_a_streamed_chat_arrives_in_chunks_and_ends_with_done(fleet: Fleet) -> None:
    request = urllib.request.Request(
        f"{fleet.base}/chat/v1/chat/completions",
        data=json.dumps(
            {
                "model": "x",
                "messages": MESSAGES,
                "max_tokens": 30,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    events: list[str] = []
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 3, chunks
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    # The last chunk before [DONE] carries the usage, which adds up.
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [], chunks[-1]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 30
    assert all(c["model"] == CHAT_NAME for c in chunks)


def test_the_sdk_stream_yields_several_chunks(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=30, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 3
    assert "".join(pieces).strip()


def test_embeddings_have_384_dimensions_and_mean_something(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.base}/embed/v1", api_key="unused")
    result = client.embeddings.create(
        model="whatever", input=["a small cat", "a little kitten", "the stock market fell"]
    )
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    # A real MiniLM puts the two cats closer together than a cat and the stock market.
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_vllm_engines_listen_on_unix_sockets_and_on_no_tcp_port(fleet: Fleet) -> None:
    """vLLM started with `--uds`: every request of this module reached it over its socket,
    in a directory only the fleet's user may open, and its server opened no TCP port."""
    from tests.conftest import listening_ports

    for upstream in fleet.upstreams(fleet.status()):
        sock = Path(upstream["socket"])
        assert upstream["url"] == f"unix:{sock}" and upstream["port"] is None
        assert sock.is_socket() and (sock.parent.stat().st_mode & 0o777) == 0o700
        assert listening_ports([int(upstream["pid"])]) == set()


def test_v1_models_lists_both_deployments(fleet: Fleet) -> None:
    ids = {model.id for model in OpenAI(base_url=f"{fleet.base}/v1", api_key="x").models.list()}
    assert {"chat", "embed"} <= ids


def test_plain_v1_with_model_chat_reaches_the_chat_engine(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.base}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=40, temperature=0
    )
    _answer(reply, 40)
    embedded = client.embeddings.create(model="embed", input="routed by the body's model")
    assert len(embedded.data[0].embedding) == 384


def test_the_status_pages_engine_figures_are_the_real_engines_metrics(
    fleet: Fleet, browser: Any
) -> None:
    """`GET /fleet/overview` and the page at /fleet/ that shows it, in Chromium: after a
    chat answered through the gateway, the chat engine's figures are vLLM's own /metrics,
    read over its socket, and the gateway measured the request's time to first token."""
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_fleet.testing.harness import engine_request

    client = OpenAI(base_url=f"{fleet.base}/chat/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="chat", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
    asked = time.time()
    url = fleet.upstream("chat")["url"]

    def engine_sums() -> dict[str, float]:
        _, page = engine_request(url, "/metrics")
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(page.decode()):
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        return sums

    def figures() -> dict[str, Any] | None:
        code, _, body = http("GET", f"{fleet.base}/fleet/overview", timeout=10)
        assert code == 200, body
        chat = next(d for d in json.loads(body)["deployments"] if d["id"] == "chat")
        engine = chat["upstreams"][0]["engine"]
        return chat if engine is not None and engine["at"] > asked else None

    chat = wait_until(figures, timeout=60, interval=0.5, what="a reading after the chat")
    engine, own = chat["upstreams"][0]["engine"], engine_sums()
    assert own["vllm:generation_tokens_total"] > 0
    assert engine["generation_tokens"] == own["vllm:generation_tokens_total"]
    assert engine["prompt_tokens"] == own["vllm:prompt_tokens_total"]
    assert engine["running"] == own["vllm:num_requests_running"] == 0
    assert engine["waiting"] == own["vllm:num_requests_waiting"] == 0
    assert engine["kv_cache"] == own["vllm:kv_cache_usage_perc"]
    assert chat["recent"]["requests"] >= 1 and chat["recent"]["ttft_p50_ms"] > 0

    # The page shows the same: the replica's running and waiting requests and KV cache.
    from selenium.webdriver.common.by import By

    from tests.test_page_browser import console_problems, eventually, rows, shoot

    browser.get(f"{fleet.base}/fleet/")
    name = chat["upstreams"][0]["name"]
    eventually(lambda: rows(browser).get(name, ("", ""))[0] == "ready", what=f"{name} ready")
    row = browser.find_element(By.CSS_SELECTOR, f'[data-replica="{name}"]')

    def cell(label: str) -> str:
        text: str = row.find_element(By.CSS_SELECTOR, f'td[data-label="{label}"]').text
        return text.strip()

    assert cell("Run") == f"{own['vllm:num_requests_running']:.0f}"
    assert cell("Wait") == f"{own['vllm:num_requests_waiting']:.0f}"
    assert cell("KV cache") == f"{own['vllm:kv_cache_usage_perc'] * 100:.0f}%"
    assert str(chat["upstreams"][0]["pid"]) == rows(browser)[name][1]
    shoot(browser, "fleet-page-vllm")
    assert console_problems(browser) == []


def test_a_killed_engine_is_restarted_and_503_until_ready(fleet: Fleet) -> None:
    """Runs last: the chat engine is killed (its whole process group) and must come back."""
    before = fleet.upstream("chat")
    assert before["state"] == "ready"
    os.killpg(before["pid"], signal.SIGKILL)

    def restarting() -> dict[str, Any] | None:
        now = fleet.upstream("chat")
        return now if now["pid"] != before["pid"] and now["state"] != "ready" else None

    wait_until(restarting, timeout=60, interval=0.2, what="the supervisor restarts chat-0")
    url = f"{fleet.base}/chat/v1/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    code, headers, payload = http("POST", url, body)
    assert code == 503, payload
    assert int(headers["Retry-After"]) > 0
    assert "chat" in json.loads(payload)["error"]["message"]

    # The embedding engine was not touched and keeps answering meanwhile.
    code, _, payload = http("POST", f"{fleet.base}/embed/v1/embeddings", {"input": "still up"})
    assert code == 200, payload

    seen_while_loading: set[int] = set()

    def ready_again() -> dict[str, Any] | None:
        now = fleet.upstream("chat")
        if now["state"] == "ready":
            return now
        status, _, _ = http("POST", url, body)
        seen_while_loading.add(status)
        return None

    after = wait_until(ready_again, timeout=READY_TIMEOUT, interval=2.0, what="chat-0 ready")
    # 503 while loading; a 200 only when it became ready between the look and the request.
    assert seen_while_loading <= {503, 200}, seen_while_loading
    assert after["restarts"] >= before["restarts"] + 1
    code, _, payload = http("POST", url, body)
    assert code == 200, payload
    assert json.loads(payload)["choices"][0]["message"]["content"].strip()
