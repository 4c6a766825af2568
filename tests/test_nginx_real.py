"""The rendered vhost in a real, unprivileged nginx in front of fake engines: path and
Azure routes reach the right engine whatever `model` the client sends, SSE is relayed
chunk by chunk, and nginx's own errors are JSON envelopes."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI

from tests.conftest import fake_fleet_file, free_ports
from tests.test_fleet_up import FleetUp
from vllm_fleet.config import load, loads
from vllm_fleet.gpus import Inventory
from vllm_fleet.nginx import render
from vllm_fleet.nginx_run import NginxNotFound, NginxProcess, check, find_nginx
from vllm_fleet.plan import build_plan
from vllm_fleet.testing.harness import FakeEngine, free_port, wait_port

pytestmark = pytest.mark.nginx

QWEN = "Qwen/Qwen2.5-1.5B-Instruct"
MISTRAL = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
TOKENS = 20
TOKEN_DELAY = 0.05


def _nginx() -> str:
    try:
        return find_nginx()
    except NginxNotFound as exc:
        pytest.skip(f"nginx not installed: {exc}")


@dataclass
class Fleet:
    url: str
    ports: dict[str, int]

    def stats(self, dep: str) -> dict[str, object]:
        data = httpx.get(f"http://127.0.0.1:{self.ports[dep]}/fake/stats").json()
        assert isinstance(data, dict)
        return data


def _two_free_ports() -> int:
    return free_ports(2)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    binary = _nginx()
    ports = {"qwen": free_port(), "mistral": free_port(), "far": free_port()}
    down = free_port()  # nothing listens here
    ports["rep"] = _two_free_ports()  # replicas take `port` and `port + 1`
    yaml_text = f"""
gateway: {{accept_any_model: true}}
engine_command: ["{{python}}", "-m", "vllm_fleet.testing.fake_vllm", "{{model}}"]
deployments:
  qwen:
    model: {QWEN}
    listen: tcp
    port: {ports["qwen"]}
    args: ["--token-delay", "{TOKEN_DELAY}", "--tokens", "{TOKENS}"]
  mistral:
    model: {MISTRAL}
    listen: tcp
    port: {ports["mistral"]}
  far:
    model: org/far
    endpoints: ["http://127.0.0.1:{ports["far"]}"]
  down:
    model: org/down
    endpoints: ["http://127.0.0.1:{down}"]
  rep:
    model: org/rep
    listen: tcp
    port: {ports["rep"]}
    replicas: 2
    args: ["--tokens", "1"]
"""
    config = loads(yaml_text)
    plan = build_plan(config, Inventory(None, "test"), sys.executable)
    procs = []
    # An engine the fleet does not start: its owner gives it VLLM_SKIP_MODEL_NAME_VALIDATION.
    remote = FakeEngine(
        "org/far",
        ["org/far", "far"],
        port=ports["far"],
        env={"VLLM_SKIP_MODEL_NAME_VALIDATION": "1"},
    )
    nginx_port = free_port()
    try:
        for spec in plan.engines:
            procs.append(
                subprocess.Popen(
                    spec.argv,
                    env={**os.environ, **spec.env},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        remote.start()
        for spec, proc in zip(plan.engines, procs, strict=True):
            wait_port(spec.port, proc=proc)
        vhost = render(config, plan, listen=f"127.0.0.1:{nginx_port}")
        with NginxProcess(vhost, nginx_port, binary):
            yield Fleet(f"http://127.0.0.1:{nginx_port}", ports)
    finally:
        remote.stop()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_path_route_reaches_its_engine_with_any_model(fleet: Fleet) -> None:
    for dep, served in (("qwen", QWEN), ("mistral", MISTRAL), ("far", "org/far")):
        client = OpenAI(base_url=f"{fleet.url}/{dep}/v1", api_key="x")
        reply = client.chat.completions.create(
            model="gpt-4-not-served", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.system_fingerprint == f"fake-{fleet.ports[dep]}"
        assert reply.model == served
        last = fleet.stats(dep)["last_request"]
        assert isinstance(last, dict)
        assert last["path"] == "/v1/chat/completions"  # the /<id> prefix is stripped
        headers = last["headers"]
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["x-real-ip"] == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"
        assert headers["host"] == "127.0.0.1"


def test_azure_route_reaches_its_engine_and_drops_api_version(fleet: Fleet) -> None:
    for dep in ("qwen", "mistral"):
        client = AzureOpenAI(
            azure_endpoint=fleet.url, azure_deployment=dep, api_version="2024-06-01", api_key="x"
        )
        reply = client.chat.completions.create(
            model="whatever", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.system_fingerprint == f"fake-{fleet.ports[dep]}"
        assert reply.choices[0].message.content == "tok0 tok1 tok2"
        last = fleet.stats(dep)["last_request"]
        assert isinstance(last, dict)
        assert last["path"] == "/v1/chat/completions"
        assert last["model"] == "whatever"  # nginx cannot rewrite it: the engine accepts it
    embeddings = AzureOpenAI(
        azure_endpoint=fleet.url, azure_deployment="mistral", api_version="2024-06-01", api_key="x"
    ).embeddings.create(model="x", input="hello")
    assert len(embeddings.data[0].embedding) == 384
    # Other query arguments survive; only api-version is dropped.
    httpx.post(
        f"{fleet.url}/openai/deployments/qwen/completions?a=1&api-version=2024-06-01&b=2",
        json={"prompt": "x", "max_tokens": 1},
    )
    last = fleet.stats("qwen")["last_request"]
    assert isinstance(last, dict) and last["path"] == "/v1/completions?a=1&b=2"


def test_stream_arrives_chunk_by_chunk(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.url}/qwen/v1", api_key="x")
    start = time.monotonic()
    arrivals: list[float] = []
    text = ""
    stream = client.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == " ".join(f"tok{i}" for i in range(TOKENS))
    assert len(arrivals) >= TOKENS + 2
    # A buffering proxy would deliver every chunk at the end, all at once.
    generation = TOKENS * TOKEN_DELAY
    assert arrivals[0] < arrivals[-1] - generation / 2


def test_client_disconnect_aborts_the_engine_request(fleet: Fleet) -> None:
    before = fleet.stats("qwen")["aborted"]
    assert isinstance(before, int)
    body = json.dumps({"prompt": "x", "stream": True, "max_tokens": 400}).encode()
    port = int(fleet.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /qwen/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(65536)
            assert chunk, "nginx closed the stream early"
            received += chunk
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and fleet.stats("qwen")["aborted"] == before:
        time.sleep(0.05)
    assert fleet.stats("qwen")["aborted"] == before + 1


def test_nginx_errors_are_openai_envelopes(fleet: Fleet) -> None:
    for path in ("/v1/chat/completions", "/nope/v1/models", "/openai/deployments/nope/x"):
        response = httpx.post(f"{fleet.url}{path}", json={"model": "qwen"})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert "qwen, mistral, far, down" in error["message"]
    response = httpx.post(f"{fleet.url}/down/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "engine_unavailable"
    # vLLM's own errors pass through untouched (here: an over-long max_tokens).
    response = httpx.post(f"{fleet.url}/qwen/v1/completions", json={"max_tokens": 10**9})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


def test_body_over_the_limit_is_a_413_envelope() -> None:
    binary = _nginx()
    config = loads(
        "gateway: {max_body_mb: 0.01}\n"
        "deployments:\n  q:\n    model: m\n    endpoints: ['http://127.0.0.1:9']\n"
    )
    plan = build_plan(config, Inventory(None, "test"), sys.executable)
    port = free_port()
    with NginxProcess(render(config, plan, listen=f"127.0.0.1:{port}"), port, binary):
        response = httpx.post(f"http://127.0.0.1:{port}/q/v1/completions", content=b"x" * 20000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_nginx_t_accepts_the_seed_example_and_reports_its_errors() -> None:
    binary = _nginx()
    seed = Path(__file__).resolve().parents[1] / "examples" / "seed-two-models.yaml"
    config = load(seed)
    text = render(config, build_plan(config, Inventory(None, "test"), sys.executable))
    ok, output = check(text, binary)
    assert ok, output
    ok, output = check(text.replace("proxy_buffering off;", "proxy_buffering sideways;"), binary)
    assert not ok and "proxy_buffering" in output
    # The unusual shapes the renderer allows: dotted ids, replicas, IPv6, https with a path.
    exotic = loads(
        """
gateway: {accept_any_model: true, max_body_mb: 0.5}
deployments:
  chat.v2_x-y:
    model: org/chat
    listen: tcp
    host: "::1"
    port: 9100
    replicas: 2
  tls:
    model: org/tls
    endpoints: ["https://127.0.0.1:8443/base/", "https://127.0.0.1:8444/base"]
  six:
    model: org/six
    endpoints: ["http://[::1]:8000"]
"""
    )
    plan = build_plan(exotic, Inventory(None, "test"), sys.executable)
    ok, output = check(
        render(exotic, plan, listen="[::1]:8080", server_name="a.example *.b"), binary
    )
    assert ok, output


def test_cli_check_runs_nginx_t() -> None:
    _nginx()
    seed = Path(__file__).resolve().parents[1] / "examples" / "seed-two-models.yaml"
    argv = [sys.executable, "-m", "vllm_fleet.cli", "nginx", str(seed), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "nginx accepts it" in done.stderr
    # nginx's own complaint is shown when it refuses (a port out of range here).
    done = subprocess.run([*argv, "--listen", "99999"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "nginx rejects it" in done.stderr and "99999" in done.stderr


def test_replicas_share_the_load_and_cover_for_a_dead_one(fleet: Fleet) -> None:
    client = OpenAI(base_url=f"{fleet.url}/rep/v1", api_key="x", max_retries=0)
    first, second = fleet.ports["rep"], fleet.ports["rep"] + 1

    def ask() -> str | None:
        reply = client.completions.create(model="m", prompt="hi")
        return reply.system_fingerprint

    assert {ask() for _ in range(6)} == {f"fake-{first}", f"fake-{second}"}
    with pytest.raises(httpx.TransportError):
        httpx.post(f"http://127.0.0.1:{first}/fake/crash?status=0")
    # A request already sent on a kept-alive connection to the dead replica is not
    # retried by nginx (POST is not idempotent): at most that one fails. After it, the
    # dead replica refuses connections and nginx passes every request to the live one.
    with contextlib.suppress(openai.InternalServerError):
        ask()
    assert {ask() for _ in range(6)} == {f"fake-{second}"}


def test_nginx_proxies_to_engines_on_unix_sockets_opened_to_its_group(tmp_path: Path) -> None:
    """`fleet up` with `engines.socket_group` set to the group of nginx's workers (run as
    root, nginx's workers are `nobody`), and the vhost `fleet nginx` renders for it: nginx
    reaches the engines over their sockets (`server unix:...`), on path and Azure routes."""
    binary = _nginx()
    group = None
    if os.geteuid() == 0:  # nginx's workers become `nobody`: give them its group
        group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    with tempfile.TemporaryDirectory(prefix="fleet-", dir="/tmp") as open_dir:
        os.chmod(open_dir, 0o755)  # passable; the socket directory itself is 0750
        path = fake_fleet_file(
            tmp_path,
            {"s": {"model": "org/s", "replicas": 2, "args": ["--tokens", "3"]}},
            engines={"socket_dir": f"{open_dir}/s", "socket_group": group},
            accept_any_model=True,
        )
        fleet = FleetUp(path)
        try:
            fleet.wait_ready(2)
            config = load(path)
            vhost = render(config, build_plan(config, Inventory(None, "test"), sys.executable),
                           listen=f"127.0.0.1:{(port := free_port())}")  # fmt: skip
            assert f"server unix:{open_dir}/s/s-0.sock " in vhost
            with NginxProcess(vhost, port, binary):
                client = OpenAI(base_url=f"http://127.0.0.1:{port}/s/v1", api_key="x")
                seen = {
                    client.completions.create(model="any", prompt="hi").system_fingerprint
                    for _ in range(4)
                }
                assert seen == {"fake-s-0", "fake-s-1"}
                azure = AzureOpenAI(
                    azure_endpoint=f"http://127.0.0.1:{port}", azure_deployment="s",
                    api_version="2024-10-21", api_key="x",
                )  # fmt: skip
                chunks = azure.chat.completions.create(
                    model="x", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == "tok0 tok1 tok2"
        finally:
            assert fleet.stop() == 0
