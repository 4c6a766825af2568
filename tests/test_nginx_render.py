"""`fleet nginx` rendering, pure: the vhost text for fleet files, and that nothing from the
fleet file (or the command line) can inject nginx directives."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_fleet.config import ConfigError, FleetConfig, load, loads
from vllm_fleet.gpus import Inventory
from vllm_fleet.nginx import NginxRenderError, render
from vllm_fleet.plan import Plan, RemoteSpec, build_plan

SEED = Path(__file__).resolve().parents[1] / "examples" / "seed-two-models.yaml"


def _plan(config: FleetConfig) -> Plan:
    return build_plan(config, Inventory(None, "test"), sys.executable)


def _render(yaml_text: str, **kwargs: str) -> str:
    config = loads(yaml_text)
    return render(config, _plan(config), **kwargs)


def _block(text: str, head: str) -> str:
    """The body of the block that starts with `head {` (blocks here do not nest)."""
    start = text.index(head + " {")
    return text[start : text.index("}", start) + 1]


def test_seed_example_routes_each_id_with_its_prefix_stripped() -> None:
    config = load(SEED)
    plan = _plan(config)
    text = render(config, plan)
    assert f"fleet nginx {SEED}" in text.splitlines()[0]
    for dep_id in ("qwen", "mistral"):
        (engine,) = plan.for_deployment(dep_id)
        upstream = _block(text, f"upstream fleet_{dep_id}")
        assert f"server {engine.url.removeprefix('http://')} " in upstream
        assert "keepalive" in upstream
        # /qwen/v1/chat/completions -> /v1/chat/completions: the location prefix is
        # replaced by the proxy_pass URI `/`.
        path_route = _block(text, f"location ^~ /{dep_id}/")
        assert f"proxy_pass http://fleet_{dep_id}/;" in path_route
        azure = _block(text, f"location ^~ /openai/deployments/{dep_id}/")
        assert f"proxy_pass http://fleet_{dep_id}/v1/;" in azure
        for header in ("Host", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto"):
            assert f"proxy_set_header {header} " in path_route
            assert f"proxy_set_header {header} " in azure
    server = text[text.index("server {") :]
    for directive in (
        "listen 80;",
        "server_name _;",
        "client_max_body_size 32m;",
        "proxy_http_version 1.1;",
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "proxy_read_timeout 3600s;",
    ):
        assert directive in server
    # The seed file does not set accept_any_model: the header says what that means.
    assert "clients must send the exact model code" in text


def test_engines_on_unix_sockets_become_unix_servers_and_the_header_says_who_may_open_them(
    tmp_path: Path,
) -> None:
    text = _render(
        f"""
engines: {{socket_dir: {tmp_path}/s, socket_group: www-data}}
deployments:
  chat: {{model: org/chat, replicas: 2}}
  old: {{model: org/old, listen: tcp}}
"""
    )
    assert re.findall(r"server (\S+) ", _block(text, "upstream fleet_chat")) == [
        f"unix:{tmp_path}/s/chat-0.sock",
        f"unix:{tmp_path}/s/chat-1.sock",
    ]
    assert re.findall(r"server (\S+) ", _block(text, "upstream fleet_old")) == ["127.0.0.1:8100"]
    assert "proxy_pass http://fleet_chat/;" in _block(text, "location ^~ /chat/")
    header = text[: text.index("upstream ")]
    assert "nginx's worker user must be able to" in header
    assert "engines: {socket_group: GROUP}" in header


def test_a_socket_path_nginx_cannot_take_safely_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NginxRenderError, match=r"engines\.socket_dir"):
        _render(f"engines: {{socket_dir: '{tmp_path}/a;b'}}\ndeployments: {{c: {{model: m}}}}\n")


def test_unknown_paths_get_a_json_404_naming_the_deployments() -> None:
    text = render(load(SEED), _plan(load(SEED)))
    fallback = _block(text, "location /")
    assert 'return 404 \'{"error":{' in fallback
    assert "deployments: qwen, mistral" in fallback
    assert "default_type application/json;" in fallback


def test_replicas_endpoints_listen_and_body_size() -> None:
    text = _render(
        """
gateway: {accept_any_model: true, max_body_mb: 1.5}
deployments:
  chat.v2:
    model: org/chat
    listen: tcp
    port: 9100
    replicas: 3
  far:
    model: org/far
    endpoints: ["http://10.1.2.3:8000", "http://10.1.2.4"]
  tls:
    model: org/tls
    endpoints: ["https://llm.example.com/base/"]
""",
        listen="127.0.0.1:8088",
        server_name="llm.example.com www.example.com",
    )
    replicas = _block(text, "upstream fleet_chat.v2")
    assert re.findall(r"server (\S+) ", replicas) == [
        "127.0.0.1:9100",
        "127.0.0.1:9101",
        "127.0.0.1:9102",
    ]
    assert re.findall(r"server (\S+) ", _block(text, "upstream fleet_far")) == [
        "10.1.2.3:8000",
        "10.1.2.4:80",
    ]
    assert "server llm.example.com:443 " in _block(text, "upstream fleet_tls")
    tls = _block(text, "location ^~ /tls/")
    assert "proxy_pass https://fleet_tls/base/;" in tls
    assert "proxy_ssl_server_name on;" in tls and "proxy_ssl_name llm.example.com;" in tls
    assert "proxy_set_header Host llm.example.com;" in tls
    azure_tls = _block(text, "location ^~ /openai/deployments/tls/")
    assert "proxy_pass https://fleet_tls/base/v1/;" in azure_tls
    assert "listen 127.0.0.1:8088;" in text
    assert "server_name llm.example.com www.example.com;" in text
    assert "client_max_body_size 1536k;" in text
    assert "exact model code" not in text and "WARNING" not in text


def test_mixed_schemes_cannot_share_an_upstream() -> None:
    with pytest.raises(NginxRenderError, match="every endpoint http or every endpoint https"):
        _render(
            "deployments:\n  r:\n    model: m\n"
            "    endpoints: ['http://10.0.0.1:8000', 'https://10.0.0.2']\n"
        )


HOSTILE = [
    "a;b",
    "a}b",
    "a{b",
    "a b",
    "a\tb",
    "a\nb",
    "a'b",
    'a"b',
    "a$b",
    "a\\b",
    "a#b",
    "ab\n",
    "\nab",
    "x; return 200 pwned",
    "x;}server{listen 81;",
]


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_values_fail_at_load_or_render(evil: str) -> None:
    """An id, host, endpoint, listen or server_name that could end a directive or open a
    block is refused: at config load, or (for values built outside the config) at render."""
    quoted = (
        evil.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    )
    for fleet in (
        f'deployments:\n  "{quoted}":\n    model: m\n',
        f'deployments:\n  q:\n    model: m\n    host: "{quoted}"\n',
        f'deployments:\n  q:\n    model: m\n    endpoints: ["http://{quoted}:8000"]\n',
        f'deployments:\n  q:\n    model: m\n    endpoints: ["http://h:8000/{quoted}"]\n',
    ):
        with pytest.raises(ConfigError):
            loads(fleet)
    config = loads("deployments:\n  q:\n    model: m\n    endpoints: ['http://h:8000']\n")
    # A plan built by other code than the config loader is checked again by the renderer.
    for url in (f"http://{evil}:8000", f"http://h:8000/{evil}", f"http://h:8000/x?{evil}"):
        plan = Plan((), (RemoteSpec("q", 0, url),), Inventory(None, "test"))
        with pytest.raises(NginxRenderError):
            render(config, plan)
    good_plan = _plan(config)
    with pytest.raises(NginxRenderError):
        render(config, good_plan, listen=f"80{evil}")
    # server_name takes several names separated by whitespace; whatever is accepted is
    # written back as plain names, one space apart.
    try:
        text = render(config, good_plan, server_name=f"x{evil}")
    except NginxRenderError:
        pass
    else:
        assert re.search(r"^    server_name [A-Za-z0-9*._-]+( [A-Za-z0-9*._-]+)*;$", text, re.M)


def test_rendered_text_has_exactly_the_expected_directives() -> None:
    """Every statement in the vhost is one the renderer writes on purpose: nothing from
    the fleet file adds a directive."""
    text = _render(
        "gateway: {accept_any_model: true}\n"
        "deployments:\n  a-b.c_d:\n    model: 'org/m;x{y}'\n    aliases: ['n;}server{']\n"
    )
    allowed = {
        "map", "default", "upstream", "server", "keepalive", "keepalive_timeout",
        "listen", "server_name",
        "client_max_body_size", "proxy_http_version", "proxy_buffering",
        "proxy_request_buffering", "proxy_cache", "gzip", "proxy_read_timeout",
        "proxy_send_timeout", "error_page", "location", "proxy_pass", "proxy_set_header",
        "set", "default_type", "return", "add_header",
    }  # fmt: skip
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped == "}":
            continue
        word = stripped.split()[0]
        if word.startswith('"~'):
            continue  # the map's regex key
        assert word in allowed, line
    # Model codes and aliases never reach the vhost (nginx does not look at them).
    assert "org/m" not in text and "n;}" not in text


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vllm_fleet.cli", "nginx", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_cli_prints_the_vhost_and_warns_without_accept_any_model(tmp_path: Path) -> None:
    done = _fleet(str(SEED), "--listen", "8080", "--server-name", "llm.example.com")
    assert done.returncode == 0, done.stderr
    assert "location ^~ /qwen/ {" in done.stdout and "listen 8080;" in done.stdout
    assert "server_name llm.example.com;" in done.stdout
    assert "exact model code" in done.stderr and "accept_any_model" in done.stderr
    out = tmp_path / "fleet.conf"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("gateway: {accept_any_model: true}\ndeployments:\n  q: {model: m}\n")
    done = _fleet(str(fleet), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "warning" not in done.stderr
    assert "upstream fleet_q {" in out.read_text()


def test_cli_refuses_an_injected_listen() -> None:
    done = _fleet(str(SEED), "--listen", "80; include /etc/passwd")
    assert done.returncode == 1
    assert "--listen" in done.stderr and "include" not in done.stdout


def test_the_docs_show_what_fleet_nginx_renders_for_the_seed_example() -> None:
    """The vhost printed in the docs ("Keeping nginx in front") is the renderer's output
    for the seed example with `accept_any_model: true` added, as the docs say."""
    root = SEED.parents[1]
    docs = [p for p in (root / "README.md", root / "docs" / "nginx.md") if p.exists()]
    section = next(
        (p.read_text() for p in docs if "## Keeping nginx in front" in p.read_text()), None
    )
    assert section is not None, "no 'Keeping nginx in front' section in README.md or docs/"
    shown = section.split("```nginx\n", 1)[1].split("\n```", 1)[0]
    text = SEED.read_text().replace("  port: 8080\n", "  port: 8080\n  accept_any_model: true\n", 1)
    config = loads(text, source="examples/seed-two-models.yaml", environ={}, base_dir="/srv/fleet")
    assert shown + "\n" == render(config, _plan(config), server_name="llm.example.com")


def test_each_routing_policy_renders_its_nginx_balancing_with_a_warning_where_it_differs() -> None:
    text_yaml = (
        "gateway: {accept_any_model: true, session_header: X-Conversation}\n"
        "deployments:\n"
        "  lo: {model: org/lo, endpoints: [http://127.0.0.1:9001, http://127.0.0.1:9002]}\n"
        "  rr: {model: org/rr, endpoints: [http://127.0.0.1:9003, http://127.0.0.1:9004],"
        " routing: round_robin}\n"
        "  px: {model: org/px, endpoints: [http://127.0.0.1:9005, http://127.0.0.1:9006],"
        " routing: prefix}\n"
        "  ss: {model: org/ss, endpoints: [http://127.0.0.1:9007, http://127.0.0.1:9008],"
        " routing: session}\n"
        "  one: {model: org/one, endpoints: [http://127.0.0.1:9009], routing: session}\n"
    )
    text = _render(text_yaml)
    balancing = ("least_conn;", "hash ")
    assert "least_conn;" in _block(text, "upstream fleet_lo")
    assert not any(b in _block(text, "upstream fleet_rr") for b in balancing)
    assert "least_conn;" in _block(text, "upstream fleet_px")
    assert "hash $http_x_conversation consistent;" in _block(text, "upstream fleet_ss")
    assert not any(b in _block(text, "upstream fleet_one") for b in balancing)  # one server
    warnings = [line for line in text.splitlines() if line.startswith("# WARNING")]
    assert any("`routing: prefix` (px)" in w and "least_conn" in w for w in warnings)
    assert any("`routing: session` (ss, one)" in w and "X-Conversation" in w for w in warnings)
