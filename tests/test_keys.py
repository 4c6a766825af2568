"""Named keys in front of real fake engines, spoken to by the `openai` SDK: which key may
use which deployment on all three route styles, what `/v1/models` shows each key, who may
read the fleet's own endpoints, and that a key's secret never appears anywhere."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2 as httpx
import openai
import pytest

from tests.gateway_harness import GatewayThread
from vllm_fleet.config.models import key_digest
from vllm_fleet.testing.harness import FakeEngine

CHAT, EMBED = "org/chat", "org/embed"
TEAM_A, TEAM_B, ADMIN, OLD = "sk-team-a-0123", "sk-team-b-4567", "sk-admin-89ab", "sk-old-cdef"


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, FakeEngine]]:
    started = {
        "chat": FakeEngine(CHAT, [CHAT, "chat"]).start(),
        "embed": FakeEngine(EMBED, [EMBED, "embed"]).start(),
    }
    yield started
    for engine in started.values():
        engine.stop()


@pytest.fixture(scope="module")
def gateway(engines: dict[str, FakeEngine]) -> Iterator[GatewayThread]:
    fleet = f"""
gateway:
  usage_db: null
  keys:
    - {{name: team-a, key_sha256: {key_digest(TEAM_A)}, deployments: [chat]}}
    - {{name: team-b, key: {TEAM_B}, deployments: [embed]}}
    - {{name: ops, key_sha256: {key_digest(ADMIN)}, admin: true}}
    - {{name: old, key: {OLD}, expires: 2020-01-31}}
deployments:
  chat:
    model: {CHAT}
    endpoints: ["{engines["chat"].url}"]
  embed:
    model: {EMBED}
    endpoints: ["{engines["embed"].url}"]
"""
    gw = GatewayThread(fleet).start()
    yield gw
    gw.stop()


def sdk(gw: GatewayThread, key: str, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}{prefix}/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI, model: str = "chat") -> str | None:
    done = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    return done.choices[0].message.content


def test_a_key_reaches_its_deployments_on_every_route_style(gateway: GatewayThread) -> None:
    assert chat(sdk(gateway, TEAM_A))  # /v1, by `model`
    assert chat(sdk(gateway, TEAM_A, "/chat"), model="anything")  # by path
    azure = openai.AzureOpenAI(
        azure_endpoint=gateway.url, api_key=TEAM_A, api_version="2024-06-01", max_retries=0
    )
    done = azure.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert done.choices[0].message.content
    vectors = sdk(gateway, TEAM_B).embeddings.create(model="embed", input="x")
    assert vectors.data


@pytest.mark.parametrize("style", ["v1", "path", "azure"])
def test_a_key_is_refused_other_deployments_and_told_only_its_own(
    gateway: GatewayThread, style: str
) -> None:
    if style == "azure":
        client: openai.OpenAI = openai.AzureOpenAI(
            azure_endpoint=gateway.url, api_key=TEAM_B, api_version="2024-06-01", max_retries=0
        )
    else:
        client = sdk(gateway, TEAM_B, "/chat" if style == "path" else "")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        chat(client)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "deployment_not_allowed"
    assert "team-b" in error["message"] and "embed" in error["message"]
    assert "chat" in error["message"]  # the deployment asked for, named back
    assert CHAT not in error["message"]


def test_an_unknown_model_lists_only_the_keys_deployments(gateway: GatewayThread) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        chat(sdk(gateway, TEAM_B), model="nope")
    message = str(missing.value)
    assert "embed" in message and "chat" not in message


def test_models_lists_what_the_key_may_use(gateway: GatewayThread) -> None:
    assert [m.id for m in sdk(gateway, TEAM_A).models.list()] == ["chat"]
    assert [m.id for m in sdk(gateway, TEAM_B).models.list()] == ["embed"]
    assert [m.id for m in sdk(gateway, ADMIN).models.list()] == ["chat", "embed"]


def test_wrong_missing_and_expired_keys_get_401(gateway: GatewayThread) -> None:
    for key in ("sk-wrong", TEAM_A + "x"):
        with pytest.raises(openai.AuthenticationError):
            chat(sdk(gateway, key))
    with pytest.raises(openai.AuthenticationError) as expired:
        chat(sdk(gateway, OLD))
    assert "expired after 2020-01-31" in str(expired.value)
    bare = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "chat"})
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/fleet/status", "/metrics", "/fleet/usage"])
def test_the_fleets_own_endpoints_need_an_admin_key(gateway: GatewayThread, path: str) -> None:
    assert httpx.get(gateway.url + path).status_code == 401
    refused = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {TEAM_A}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_required"
    allowed = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {ADMIN}"})
    # /fleet/usage: this fleet keeps no ledger (usage_db: null), and says so.
    assert allowed.status_code == (404 if path == "/fleet/usage" else 200)
    assert httpx.get(gateway.url + "/health").status_code == 200  # load balancers: open


def test_metrics_count_by_key_name_and_never_show_a_key(gateway: GatewayThread) -> None:
    chat(sdk(gateway, TEAM_A))
    with pytest.raises(openai.PermissionDeniedError):
        chat(sdk(gateway, TEAM_B))
    text = httpx.get(gateway.url + "/metrics", headers={"api-key": ADMIN}).text
    assert 'fleet_key_requests_total{deployment="chat",key="team-a",status="200"}' in text
    assert 'fleet_key_requests_total{deployment="chat",key="team-b",status="403"}' in text
    assert 'fleet_key_tokens_total{deployment="chat",key="team-a",kind="completion"}' in text
    status = httpx.get(gateway.url + "/fleet/status", headers={"api-key": ADMIN}).text
    for secret in (TEAM_A, TEAM_B, ADMIN, OLD):
        assert secret not in text and secret not in status
        assert key_digest(secret) not in text and key_digest(secret) not in status


def test_metrics_public_opens_metrics_alone(engines: dict[str, FakeEngine]) -> None:
    fleet = f"""
gateway:
  usage_db: null
  metrics_public: true
  keys: [{{name: a, key: {TEAM_A}}}]
deployments:
  chat: {{model: {CHAT}, endpoints: ["{engines["chat"].url}"]}}
"""
    gw = GatewayThread(fleet).start()
    try:
        assert httpx.get(gw.url + "/metrics").status_code == 200
        assert httpx.get(gw.url + "/fleet/status").status_code == 401
    finally:
        gw.stop()


def test_legacy_api_keys_reach_everything(engines: dict[str, FakeEngine]) -> None:
    fleet = f"""
gateway:
  usage_db: null
  api_keys: [{TEAM_A}]
deployments:
  chat: {{model: {CHAT}, endpoints: ["{engines["chat"].url}"]}}
  embed: {{model: {EMBED}, endpoints: ["{engines["embed"].url}"]}}
"""
    gw = GatewayThread(fleet).start()
    try:
        assert chat(sdk(gw, TEAM_A))
        assert sdk(gw, TEAM_A).embeddings.create(model="embed", input="x").data
        headers = {"Authorization": f"Bearer {TEAM_A}"}
        assert httpx.get(gw.url + "/fleet/status", headers=headers).status_code == 200
    finally:
        gw.stop()


def test_a_key_matches_on_the_bytes_the_client_sends() -> None:
    from vllm_fleet.config import loads
    from vllm_fleet.gateway.keys import Client, KeyTable

    table = KeyTable(
        loads("gateway: {keys: [{name: u, key: clé-ü}]}\ndeployments: {a: {model: m}}")
    )
    sent = "clé-ü".encode().decode("latin-1")  # how a header value reaches the gateway
    assert isinstance(table.identify(None, f"Bearer {sent}"), Client)
    assert isinstance(table.identify(sent, None), Client)
    assert not isinstance(table.identify("clé-ü", None), Client)  # not its UTF-8 bytes
