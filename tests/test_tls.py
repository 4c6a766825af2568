"""`gateway.tls`: the gateway serves HTTPS with the fleet file's certificate and key.

A CA and server certificates for 127.0.0.1 and localhost are made for the run (trustme).
The real `fleet up` with fake engines serves the openai SDK (chat, a stream, AzureOpenAI)
over TLS 1.2+ with ALPN http/1.1; plain HTTP to the TLS port gets no answer and disturbs
nothing; `fleet status` and `fleet reload` reach it (trusting the fleet file's own
certificate, or `--cacert`); a reload reads a renewed certificate for new connections and
refuses turning TLS off. Files that cannot be used are refused by `fleet check` and
`fleet up` with the place named. The early answers' lingering close and the header
timeout hold over TLS too (the gateway harness).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import requests
import trustme
import yaml

from tests.conftest import fake_fleet_file, wait_until
from tests.gateway_harness import GatewayThread
from tests.test_fleet_up import FleetUp
from vllm_fleet.config import load
from vllm_fleet.nginx import warnings
from vllm_fleet.testing.harness import FakeEngine

MODEL = "org/secure"


@dataclass
class Pki:
    dir: Path
    ca: Path  # the CA's certificate: what clients trust
    cert: Path  # the server's certificate chain, as the fleet file names it
    key: Path
    renewed: trustme.LeafCert  # another certificate of the same CA, for a reload
    stranger_key: Path  # a private key of another certificate


def _write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> None:
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("tls-fleet")
    (root / "tls").mkdir()
    # As a public certificate comes: a leaf and the intermediate that issued it, in one
    # file; a renewal is another leaf of the same intermediate.
    root_ca = trustme.CA()
    ca = root_ca.create_child_ca()
    pki = Pki(
        dir=root,
        ca=root / "ca.pem",
        cert=root / "tls" / "cert.pem",
        key=root / "tls" / "key.pem",
        renewed=ca.issue_cert("127.0.0.1", "localhost"),
        stranger_key=root / "stranger-key.pem",
    )
    root_ca.cert_pem.write_to_path(str(pki.ca))
    _write_leaf(ca.issue_cert("127.0.0.1", "localhost"), pki.cert, pki.key)
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(pki.stranger_key))
    return pki


def trusting(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


class TlsFleet(FleetUp):
    """`fleet up` serving HTTPS; its /fleet/status read over TLS."""

    def __init__(self, path: Path, trust: ssl.SSLContext) -> None:
        self.trust = trust
        super().__init__(path)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    def status(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(
                f"{self.url}/fleet/status", timeout=2, context=self.trust
            ) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except OSError:
            return None


@pytest.fixture(scope="module")
def fleet(pki: Pki) -> Iterator[TlsFleet]:
    # Relative paths: resolved from the fleet file's directory, as every path in it.
    path = fake_fleet_file(
        pki.dir, {"chat": {"model": MODEL}}, tls={"cert": "tls/cert.pem", "key": "tls/key.pem"}
    )
    started = TlsFleet(path, trusting(pki))
    try:
        started.wait_ready(1)
        yield started
    finally:
        if started.proc.poll() is None:
            started.proc.send_signal(signal.SIGTERM)
            try:
                started.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                started.proc.kill()
                started.proc.wait()


def fleet_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "COLUMNS": "200"},
    )


def sdk_client(fleet: TlsFleet, pki: Pki) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{fleet.url}/chat/v1",
        api_key="unused",
        http_client=httpx.Client(verify=trusting(pki)),
        max_retries=0,
    )


# ------------------------------------------------------------------- fleet up over TLS


def test_the_openai_sdk_chats_and_streams_over_https(fleet: TlsFleet, pki: Pki) -> None:
    client = sdk_client(fleet, pki)
    reply = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    stream = client.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"


def test_azure_openai_over_https(fleet: TlsFleet, pki: Pki) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=fleet.url,
        azure_deployment="chat",
        api_version="2024-10-21",
        api_key="unused",
        http_client=httpx.Client(verify=trusting(pki)),
        max_retries=0,
    )
    reply = client.chat.completions.create(
        model="whatever", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].message.content == "tok0 tok1"


def test_the_handshake_is_tls_1_2_or_newer_with_alpn_http_1_1_only(
    fleet: TlsFleet, pki: Pki
) -> None:
    context = trusting(pki)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", fleet.gateway_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the relay speaks 1.1
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(b"GET /chat/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    # A client that stops at TLS 1.2 is served too.
    older = trusting(pki)
    older.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", fleet.gateway_port), timeout=10) as raw,
        older.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"


def test_plain_http_to_the_tls_port_gets_no_answer_and_the_gateway_keeps_serving(
    fleet: TlsFleet, pki: Pki
) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", fleet.gateway_port), timeout=10) as sock:
            sock.sendall(b"GET /chat/health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        assert not answer.startswith(b"HTTP/")  # a TLS alert at most, never an answer
    reply = sdk_client(fleet, pki).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert reply.choices[0].message.content == "tok0"
    assert fleet.proc.poll() is None
    assert "Traceback" not in fleet.text()


def test_the_ready_line_and_fleet_status_speak_https(fleet: TlsFleet, pki: Pki) -> None:
    wait_until(lambda: f"ready: {fleet.url}" in fleet.text(), what="the https ready line")
    # The fleet file given: its own gateway.tls.cert is trusted (a chain of a private CA).
    shown = fleet_cli("status", str(fleet.path))
    assert shown.returncode == 0, shown.stderr
    assert "chat-0" in shown.stdout and "ready" in shown.stdout
    # An address alone: --cacert says what to trust.
    shown = fleet_cli("status", "--url", fleet.url, "--cacert", str(pki.ca))
    assert shown.returncode == 0, shown.stderr
    assert "chat-0" in shown.stdout
    # Nothing to trust it by: a message that says what to pass, no traceback.
    shown = fleet_cli("status", "--url", fleet.url)
    assert shown.returncode == 1
    assert "does not trust" in shown.stderr and "--cacert" in shown.stderr
    assert "Traceback" not in shown.stderr
    # http:// to the TLS port: unreachable, and the message says why it may be.
    shown = fleet_cli("status", "--url", f"http://127.0.0.1:{fleet.gateway_port}")
    assert shown.returncode == 1
    assert "https://" in shown.stderr and "Traceback" not in shown.stderr


def _peer_certificate(fleet: TlsFleet, pki: Pki) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", fleet.gateway_port), timeout=10) as raw,
        trusting(pki).wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_reload_reads_a_renewed_certificate_for_new_connections(
    fleet: TlsFleet, pki: Pki
) -> None:
    renewed = ssl.PEM_cert_to_DER_cert(pki.renewed.cert_chain_pems[0].bytes().decode())
    assert _peer_certificate(fleet, pki) != renewed
    # A connection opened before the reload keeps its certificate and goes on serving.
    client = sdk_client(fleet, pki)
    client.chat.completions.create(model="m", messages=[], max_tokens=1)
    _write_leaf(pki.renewed, pki.cert, pki.key)  # same names, new bytes (certbot's way)
    # The CLI trusts the file's chain: the gateway's certificate, not yet renewed, was
    # issued by the same intermediate.
    done = fleet_cli("reload", str(fleet.path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "changed on disk" in done.stdout
    assert _peer_certificate(fleet, pki) == renewed
    reply = client.chat.completions.create(model="m", messages=[], max_tokens=1)
    assert reply.choices[0].message.content == "tok0"


def test_a_reload_turning_tls_off_is_refused(fleet: TlsFleet, pki: Pki) -> None:
    original = fleet.path.read_text()
    data = yaml.safe_load(original)
    del data["gateway"]["tls"]
    plain = fleet.path.with_name("plain.yaml")
    plain.write_text(yaml.safe_dump(data, sort_keys=False))
    refused = fleet_cli("reload", str(plain), "--url", fleet.url, "--cacert", str(pki.ca))
    assert refused.returncode == 1
    assert "gateway.tls removed" in refused.stderr + refused.stdout
    assert fleet.proc.poll() is None
    assert fleet.status() is not None  # still serving HTTPS


def test_fleet_nginx_says_the_vhost_does_not_carry_gateway_tls(pki: Pki) -> None:
    path = fake_fleet_file(
        pki.dir,
        {"chat": {"model": MODEL}},
        name="nginx.yaml",
        tls={"cert": "c.pem", "key": "k.pem"},
    )
    config = load(path)
    (said,) = [w for w in warnings(config) if "gateway.tls" in w]
    assert f"ssl_certificate {pki.dir / 'c.pem'};" in said
    assert f"ssl_certificate_key {pki.dir / 'k.pem'};" in said


# --------------------------------------------------------- certificates that cannot be used


@pytest.mark.parametrize(
    ("cert", "key", "place", "said"),
    [
        ("missing.pem", "tls/key.pem", "gateway.tls.cert", "cannot read"),
        ("tls/cert.pem", "missing.pem", "gateway.tls.key", "cannot read"),
        ("tls/cert.pem", "stranger-key.pem", "gateway.tls.key", "is not the private key"),
        ("tls/key.pem", "tls/key.pem", "gateway.tls.cert", "no usable PEM certificate"),
        ("tls/cert.pem", "tls/cert.pem", "gateway.tls.key", "no usable PEM private key"),
    ],
)
def test_fleet_check_refuses_a_certificate_or_key_it_cannot_use(
    pki: Pki, tmp_path: Path, cert: str, key: str, place: str, said: str
) -> None:
    path = fake_fleet_file(
        pki.dir, {"chat": {"model": MODEL}}, name="bad.yaml", tls={"cert": cert, "key": key}
    )
    checked = fleet_cli("check", str(path))
    assert checked.returncode == 1, checked.stdout
    assert place in checked.stderr and said in checked.stderr
    shown = key if place.endswith("key") else cert
    assert str(pki.dir / shown) in checked.stderr  # the file, resolved
    assert "Traceback" not in checked.stderr


def test_fleet_up_refuses_a_missing_key_before_it_starts_anything(pki: Pki, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    path = fake_fleet_file(
        tmp_path,
        {"chat": {"model": MODEL}},
        tls={"cert": str(pki.cert), "key": str(tmp_path / "nope.pem")},
    )
    up = FleetUp(path)
    assert up.proc.wait(timeout=30) == 1
    out = up.text()
    assert "gateway.tls.key" in out and "nope.pem" in out
    assert "Traceback" not in out
    assert not (logs / "chat-0.log").exists()  # no engine was started


# ------------------------------------------------- early answers and timeouts over TLS


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine(MODEL, [MODEL, "m"]) as started:
        yield started


@pytest.fixture(scope="module")
def gateway(engine: FakeEngine, pki: Pki) -> Iterator[GatewayThread]:
    fleet = (
        f"gateway:\n  max_body_mb: 1\n  header_timeout: 1\n  lingering_max_mb: 32\n"
        f"  tls: {{cert: '{pki.cert}', key: '{pki.key}'}}\n"
        f"deployments:\n  m:\n    model: {MODEL}\n    endpoints: ['{engine.url}']\n"
    )
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


BIG = 16 << 20


@pytest.mark.parametrize("client", ["requests", "openai"])
def test_a_body_over_the_limit_gets_the_413_envelope_over_tls(
    gateway: GatewayThread, pki: Pki, client: str
) -> None:
    """No half-close over TLS: the gateway reads and drops the rest of the body (the
    lingering close) and the client, which sends it whole first, still gets the 413."""
    assert gateway.url.startswith("https://")
    prompt = "x" * BIG
    if client == "requests":
        answer = requests.post(
            f"{gateway.url}/m/v1/completions",
            json={"prompt": prompt},
            verify=str(pki.ca),
            timeout=120,
        )
        status, body = answer.status_code, answer.json()
        assert answer.headers["connection"] == "close"
    else:
        sdk = openai.OpenAI(
            base_url=f"{gateway.url}/m/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
            http_client=httpx.Client(verify=trusting(pki)),
        )
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.completions.create(model="m", prompt=prompt)
        status, body = raised.value.status_code, raised.value.response.json()
    assert status == 413
    assert body["error"]["code"] == "request_too_large"
    wait_until(lambda: gateway.connection_count() == 0, what="the connection closed")


def test_a_client_sending_forever_over_tls_is_cut_off_at_lingering_max_mb(
    gateway: GatewayThread, pki: Pki
) -> None:
    head = (
        b"POST /m/v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000000\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw,
        trusting(pki).wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(head)
        answer = b""
        while b"request_too_large" not in answer:
            data = sock.recv(65536)
            assert data, answer
            answer += data
        assert answer.startswith(b"HTTP/1.1 413 ")
        sent, zeros = 0, b"\0" * 65536
        with pytest.raises(OSError):  # reset, broken pipe, or the TLS layer saying so
            while sent < 512 << 20:
                sock.sendall(zeros)
                sent += len(zeros)
    assert sent < 512 << 20  # cut off near lingering_max_mb (32), not let run on
    wait_until(lambda: gateway.connection_count() == 0, what="the connection closed")


def test_a_trickled_head_over_tls_gets_408(gateway: GatewayThread, pki: Pki) -> None:
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as raw,
        trusting(pki).wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"POST /m/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for _ in range(300):  # a header byte every 0.2 s, for ever: only the gateway ends it
            sock.sendall(b"X")
            sock.settimeout(0.2)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(30)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ssl.SSLError, ConnectionResetError):
            pass
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    wait_until(lambda: gateway.connection_count() == 0, what="the slow connection closed")


def test_a_handshake_never_begun_is_closed_after_header_timeout(gateway: GatewayThread) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        try:
            data = sock.recv(65536)  # the gateway closes it; we send nothing
        except ConnectionResetError:
            data = b""
    assert data == b""
