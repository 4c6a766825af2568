"""Pure: a fleet (config + plan) becomes an nginx vhost that routes like the gateway's
path and Azure routes.

The text works both as a file in /etc/nginx/sites-enabled/ and inside any `http {}`
block: it holds `upstream`, `map` and `server` blocks only. Everything taken from the
fleet file is checked against a strict pattern before it is written, so no value can
end a directive or open a block (`NginxRenderError` names the offending place).

Engines on Unix sockets (`listen: uds`, the default) become `server unix:/path;` lines:
nginx's worker user must be able to open engines.socket_dir, which only the fleet's user
can by default (0700); `engines.socket_group` (nginx's group) opens it to that group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from vllm_fleet.config import FleetConfig
from vllm_fleet.plan import EngineSpec, Plan, RemoteSpec

READ_TIMEOUT = "3600s"
# Idle keep-alive connections kept per worker for each deployment: enough for many
# concurrent clients without reconnecting; closed before vLLM's (uvicorn's) own 5 s idle
# timeout, so nginx never sends a request on a connection the engine is closing.
KEEPALIVE = 256
KEEPALIVE_TIMEOUT = "4s"

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])$")
_URL = re.compile(
    r"^https?://(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?(?:/[A-Za-z0-9._~%/-]*)?$"
)
_PATH = re.compile(r"^(?:/[A-Za-z0-9._~%-]+)*$")
# An engine's socket: an absolute path of safe characters (no space, `;`, quote, brace).
_SOCKET = re.compile(r"^(?:/[A-Za-z0-9._~+@=-]+)+$")
_LISTEN = re.compile(r"^(?:(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):)?\d{1,5}$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9*._-]{1,253}$")


class NginxRenderError(ValueError):
    """A value that cannot be written into an nginx vhost safely, or a layout nginx
    cannot express (e.g. http and https endpoints in one deployment)."""


@dataclass(frozen=True)
class Upstream:
    """One deployment as nginx sees it: an upstream group and how to reach it."""

    deployment: str
    scheme: str  # http | https
    servers: tuple[str, ...]  # host:port, or unix:/path
    prefix: str  # path prefix on the engines ("" for vLLM itself)
    tls_name: str | None  # the TLS server name (and Host) for https endpoints

    @property
    def name(self) -> str:
        return f"fleet_{self.deployment}"


def upstreams(config: FleetConfig, plan: Plan) -> list[Upstream]:
    """Every deployment's upstream, in fleet-file order; raises NginxRenderError."""
    found = []
    for dep_id in config.deployments:
        if not _ID.fullmatch(dep_id):
            raise NginxRenderError(f"deployments.{dep_id}: the id is not URL-safe")
        targets = plan.for_deployment(dep_id)
        if not targets:
            raise NginxRenderError(f"deployments.{dep_id}: no engine or endpoint to route to")
        found.append(_upstream(dep_id, targets))
    return found


def _upstream(dep_id: str, targets: list[EngineSpec | RemoteSpec]) -> Upstream:
    parsed = []
    for index, target in enumerate(targets):
        where = (
            f"deployments.{dep_id}.endpoints[{target.replica}]"
            if isinstance(target, RemoteSpec)
            else f"deployments.{dep_id}.host"
        )
        if isinstance(target, EngineSpec) and target.uds is not None:
            if not _SOCKET.fullmatch(str(target.uds)):
                raise NginxRenderError(
                    f"engines.socket_dir: the socket `{target.uds}` cannot be written into an "
                    "nginx config safely (letters, digits, `.`, `_`, `-`, `/`); pick a plainer "
                    "directory"
                )
            parsed.append((index, "http", f"unix:{target.uds}", "", ""))
            continue
        if not _URL.fullmatch(target.url):
            raise NginxRenderError(
                f"{where}: `{target.url}` cannot be written into an nginx config safely "
                "(http(s)://host[:port][/path]; no spaces, quotes, `;`, `{`, `}` or query)"
            )
        url = urlsplit(target.url)
        host = url.hostname or ""
        host = f"[{host}]" if ":" in host else host
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            raise NginxRenderError(f"{where}: bad port in `{target.url}`") from None
        path = url.path.rstrip("/")
        if (
            url.scheme not in ("http", "https")
            or not _HOST.fullmatch(host)
            or not _PATH.fullmatch(path)
        ):
            raise NginxRenderError(
                f"{where}: `{target.url}` cannot be written into an nginx config safely "
                "(hosts are letters, digits, `.`, `-`; paths have no spaces, quotes, `;`, "
                "`{` or `}`)"
            )
        if url.query or url.fragment or url.username or url.password:
            raise NginxRenderError(f"{where}: `{target.url}` has a query, fragment or userinfo")
        parsed.append((index, url.scheme, f"{host}:{port}", path, url.hostname or ""))
    schemes = {p[1] for p in parsed}
    prefixes = {p[3] for p in parsed}
    if len(schemes) > 1:
        raise NginxRenderError(
            f"deployments.{dep_id}.endpoints: nginx proxies one upstream group with one scheme; "
            "make every endpoint http or every endpoint https"
        )
    if len(prefixes) > 1:
        raise NginxRenderError(
            f"deployments.{dep_id}.endpoints: every endpoint needs the same path prefix "
            f"for nginx (got {', '.join(sorted(prefixes))})"
        )
    scheme = parsed[0][1]
    tls_name = None
    if scheme == "https":
        names = {p[4] for p in parsed}
        if len(names) > 1:
            raise NginxRenderError(
                f"deployments.{dep_id}.endpoints: nginx sends one TLS server name per "
                f"deployment; these https endpoints have several ({', '.join(sorted(names))})"
            )
        tls_name = names.pop()
    servers = tuple(dict.fromkeys(p[2] for p in parsed))
    return Upstream(dep_id, scheme, servers, prefixes.pop(), tls_name)


def warnings(config: FleetConfig) -> list[str]:
    """What nginx in front does differently from the gateway, for this fleet file."""
    found = []
    if not config.gateway.accept_any_model:
        found.append(
            "the fleet file does not set `gateway: {accept_any_model: true}`: nginx cannot "
            "rewrite `model`, so clients must send the exact model code"
        )
    if config.gateway.api_keys or config.gateway.keys:
        found.append(
            "gateway.keys / gateway.api_keys (and their limits and usage ledger) are not "
            "enforced by the nginx vhost; protect it in nginx (auth_request, allow/deny), "
            "or keep `fleet up` behind nginx (proxy_pass to the gateway)"
        )
    if config.adapters:
        found.append(
            f"the LoRA adapters ({', '.join(config.adapters)}) get no location of their "
            "own: nginx cannot set `model` to the adapter; through nginx, send it to its "
            "base's path with the adapter's id as `model` (/<base>/v1/... with "
            '"model": "<adapter>"); `fleet up` still loads the adapters into the engines'
        )
    by_prompt = [d_id for d_id, d in config.deployments.items() if d.routing == "prefix"]
    if by_prompt:
        found.append(
            f"`routing: prefix` ({', '.join(by_prompt)}) needs the request's prompt, which "
            "nginx cannot read: these groups balance by least_conn instead"
        )
    by_session = [d_id for d_id, d in config.deployments.items() if d.routing == "session"]
    if by_session:
        found.append(
            f"`routing: session` ({', '.join(by_session)}) hashes the "
            f"{config.gateway.session_header} header in nginx; a request without it, or "
            "with only the body's `user`, goes to one server of the group"
        )
    tls = config.gateway.tls
    if tls is not None:
        found.append(
            "gateway.tls is the gateway's own: this vhost listens in plain HTTP; for HTTPS "
            f"add `ssl` to its `listen` and `ssl_certificate {config.path_of(tls.cert)};` "
            f"`ssl_certificate_key {config.path_of(tls.key)};` (readable by nginx's user)"
        )
    return found


def _balancing(config: FleetConfig, routing: str) -> list[str]:
    """The upstream group's balancing for a deployment's `routing` (nginx's default is
    round robin); `prefix` has no nginx equivalent (warnings() says so)."""
    if routing == "round_robin":
        return []
    if routing == "session":
        variable = "$http_" + config.gateway.session_header.lower().replace("-", "_")
        return [f"    hash {variable} consistent;"]
    return ["    least_conn;"]  # least_outstanding, and prefix's fallback


def render(config: FleetConfig, plan: Plan, listen: str = "80", server_name: str = "_") -> str:
    """The complete vhost for this fleet. Raises NginxRenderError on unsafe values."""
    if not _LISTEN.fullmatch(listen):
        raise NginxRenderError(f"--listen `{listen}`: give a port or ADDRESS:PORT, e.g. 8080")
    names = server_name.split()
    if not names or not all(_SERVER_NAME.fullmatch(n) for n in names):
        raise NginxRenderError(
            f"--server-name `{server_name}`: host names (letters, digits, `.`, `-`, `*`) or `_`"
        )
    groups = upstreams(config, plan)
    ids = ", ".join(g.deployment for g in groups)
    out = [*_header(config), *_maps()]
    for group in groups:
        out += [f"upstream {group.name} {{"]
        if len(group.servers) > 1:
            out += _balancing(config, config.deployments[group.deployment].routing)
        out += [f"    server {server} max_fails=1 fail_timeout=5s;" for server in group.servers]
        out += [
            f"    keepalive {KEEPALIVE};",
            f"    keepalive_timeout {KEEPALIVE_TIMEOUT};",
            "}",
            "",
        ]
    out += [
        "server {",
        f"    listen {listen};",
        f"    server_name {' '.join(names)};",
        "",
        f"    client_max_body_size {_body_size(config.gateway.max_body_mb)};",
        "    # Streaming: relay bytes as they arrive, both ways; generations can be slow.",
        "    proxy_http_version 1.1;",
        "    proxy_buffering off;",
        "    proxy_request_buffering off;",
        "    proxy_cache off;",
        "    gzip off;",
        f"    proxy_read_timeout {READ_TIMEOUT};",
        f"    proxy_send_timeout {READ_TIMEOUT};",
        "    # Errors nginx makes itself (engine down, body too big) in the OpenAI envelope.",
        "    error_page 502 503 504 =503 @fleet_unavailable;",
        "    error_page 413 @fleet_too_large;",
        "",
    ]
    for group in groups:
        out += _locations(group)
    out += _fallbacks(ids, config.gateway.max_body_mb)
    out += ["}", ""]
    return "\n".join(out)


def _header(config: FleetConfig) -> list[str]:
    source = re.sub(r"[^\x20-\x7e]", "?", config.source)
    lines = [
        f"# Generated by `fleet nginx {source}`; edit the fleet file and re-run, not this file.",
        "# nginx routes by path only (/<id>/v1/... and /openai/deployments/<id>/...) and",
        "# cannot rewrite the JSON body, so the engines must accept any `model`: set",
        "# `gateway: {accept_any_model: true}` in the fleet file (engines then start with",
        "# VLLM_SKIP_MODEL_NAME_VALIDATION=1). /v1/... routing by `model`, the merged",
        "# /v1/models and API keys are the built-in gateway's job (`fleet up`).",
    ]
    if any(d.listen == "uds" and not d.remote for d in config.deployments.values()):
        lines += [
            "# Engines on Unix sockets (`server unix:...`): nginx's worker user must be able to",
            "# open the socket directory (engines.socket_dir), which is 0700, the fleet's user's",
            "# only, unless the fleet file sets `engines: {socket_group: GROUP}` with nginx's",
            "# group (e.g. www-data): then the directory is 0750 and the sockets 0660, that",
            "# group's. Or set `listen: tcp` on the deployments nginx proxies to.",
        ]
    lines += [f"# WARNING: {warning}" for warning in warnings(config)]
    return [*lines, ""]


def _maps() -> list[str]:
    # Azure clients add ?api-version=...; like the gateway, do not forward it. (The same
    # map in two vhosts is harmless: nginx keeps one definition.)
    return [
        "map $args $fleet_azure_args {",
        '    "~^(?<fleet_args_pre>.*?)(?:^|&)api-version=[^&]*(?<fleet_args_post>.*)$"'
        " $fleet_args_pre$fleet_args_post;",
        "    default $args;",
        "}",
        "",
    ]


def _locations(group: Upstream) -> list[str]:
    base = f"{group.scheme}://{group.name}{group.prefix}"
    # proxy_set_header is all-or-nothing per level, so every location sets all of them.
    headers = [
        f"        proxy_set_header Host {group.tls_name or '$host'};",
        '        proxy_set_header Connection "";',
        "        proxy_set_header X-Real-IP $remote_addr;",
        "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "        proxy_set_header X-Forwarded-Proto $scheme;",
    ]
    if group.tls_name:
        headers += [
            "        proxy_ssl_server_name on;",
            f"        proxy_ssl_name {group.tls_name};",
            "        # Verify the endpoint's certificate: proxy_ssl_verify on; and",
            "        # proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;",
        ]
    dep = group.deployment
    return [
        f"    # {dep}: /{dep}/v1/chat/completions -> {base}/v1/chat/completions",
        f"    location ^~ /{dep}/ {{",
        f"        proxy_pass {base}/;",
        *headers,
        "    }",
        f"    location ^~ /openai/deployments/{dep}/ {{",
        "        set $args $fleet_azure_args;",
        f"        proxy_pass {base}/v1/;",
        *headers,
        "    }",
        "",
    ]


def _fallbacks(ids: str, max_body_mb: float) -> list[str]:
    not_found = _envelope(
        f"no such path; use /<deployment>/v1/... or /openai/deployments/<deployment>/... "
        f"(nginx routes by path only); deployments: {ids}",
        "not_found_error",
        "not_found",
    )
    unavailable = _envelope(
        "the engine behind this deployment is not reachable (still loading, or down)",
        "service_unavailable_error",
        "engine_unavailable",
    )
    too_large = _envelope(
        f"request body too large (limit {max_body_mb:g} MB, gateway.max_body_mb)",
        "invalid_request_error",
        "request_too_large",
    )
    return [
        "    location / {",
        "        default_type application/json;",
        f"        return 404 '{not_found}';",
        "    }",
        "    location @fleet_unavailable {",
        "        default_type application/json;",
        "        add_header Retry-After 5 always;",
        f"        return 503 '{unavailable}';",
        "    }",
        "    location @fleet_too_large {",
        "        default_type application/json;",
        f"        return 413 '{too_large}';",
        "    }",
    ]


def _envelope(message: str, kind: str, code: str) -> str:
    # Written into a single-quoted nginx string: no quote, backslash or `$` may appear.
    body = f'{{"error":{{"message":"{message}","type":"{kind}","param":null,"code":"{code}"}}}}'
    if re.search(r"['\\$]", body):
        raise NginxRenderError(f"unsafe characters in an error body: {body}")
    return body


def _body_size(max_body_mb: float) -> str:
    kib = max(1, round(max_body_mb * 1024))
    return f"{kib // 1024}m" if kib % 1024 == 0 else f"{kib}k"
