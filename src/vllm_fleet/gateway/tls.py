"""TLS for the gateway (`gateway.tls: {cert, key}`) and for the CLI that talks to it.

The server's context: TLS 1.2 and up, the certificate chain and key from the fleet file
(PEM, relative to it), ALPN offering `http/1.1` only (the relay speaks nothing else). A
file that is missing, unreadable, not PEM, or a key that does not match the certificate
is a `ConfigError` naming `gateway.tls.cert` or `gateway.tls.key`, its line and the file,
raised by `fleet check`, by `fleet up` before it binds, and by a reload (which then
changes nothing).

The CLI's context (`fleet status`, `reload`, `diff`): the system's trusted CAs (and
`SSL_CERT_FILE`, which OpenSSL reads), plus `--cacert FILE` when given, else the fleet
file's own `gateway.tls.cert` when the command was given the fleet file: that certificate
is trusted as it stands (pinned: a self-signed one, or a leaf issued by a private CA,
verifies without its CA). The host name is always checked: the certificate must name the
address the CLI uses (127.0.0.1 for a gateway on 0.0.0.0; `--url` for another name).
"""

from __future__ import annotations

import hashlib
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from vllm_fleet.config import ConfigError, ConfigIssue, FleetConfig

ALPN = ["http/1.1"]


@dataclass(frozen=True)
class ServerTls:
    """The gateway's TLS context and a digest of the files it was built from (a reload
    that finds other bytes under the same names says so in its plan)."""

    context: ssl.SSLContext
    digest: str
    cert: Path
    key: Path


def server_tls(config: FleetConfig) -> ServerTls | None:
    """The gateway's TLS context from `gateway.tls` (None without it); ConfigError when
    a file cannot be used."""
    tls = config.gateway.tls
    if tls is None:
        return None
    cert, key = config.path_of(tls.cert), config.path_of(tls.key)
    contents: dict[str, bytes] = {}
    issues = []
    for field, path in (("cert", cert), ("key", key)):
        try:
            contents[field] = path.read_bytes()
        except OSError as exc:
            issues.append(_issue(config, field, f"cannot read {path}: {exc.strerror or exc}"))
            continue
        if b"-----BEGIN " not in contents[field]:
            what = "certificate" if field == "cert" else "private key"
            issues.append(_issue(config, field, f"{path} is not a PEM {what} (no -----BEGIN)"))
    if issues:
        raise ConfigError(config.source, issues)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(config.source, [_chain_issue(config, cert, key, exc)]) from None
    except OSError as exc:  # pragma: no cover (read just above; a file gone in between)
        issue = _issue(config, "cert", f"cannot load {cert} with {key}: {exc}")
        raise ConfigError(config.source, [issue]) from None
    digest = hashlib.sha256(contents["cert"] + b"\0" + contents["key"]).hexdigest()[:12]
    return ServerTls(context, digest, cert, key)


def _issue(config: FleetConfig, field: str, message: str) -> ConfigIssue:
    loc = ("gateway", "tls", field)
    return ConfigIssue(loc=loc, message=message, line=config.line_of(loc))


def _chain_issue(config: FleetConfig, cert: Path, key: Path, exc: ssl.SSLError) -> ConfigIssue:
    """Which file `load_cert_chain` refused, and why, as a person reads it."""
    if "KEY_VALUES_MISMATCH" in str(exc.reason or ""):
        return _issue(config, "key", f"{key} is not the private key of the certificate in {cert}")
    try:  # OpenSSL names neither file: parse the certificates alone to tell
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError as cert_exc:
        return _issue(config, "cert", f"{cert} holds no usable PEM certificate ({_said(cert_exc)})")
    return _issue(config, "key", f"{key} holds no usable PEM private key ({_said(exc)})")


def _said(exc: ssl.SSLError) -> str:
    return re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))


def client_context(cafile: Path | None = None, pinned: Path | None = None) -> ssl.SSLContext:
    """The CLI's context for an https gateway: the system's CAs, plus `cafile` (a CA
    bundle), plus `pinned` (a certificate trusted as it stands, even when it is not a
    CA: the fleet file's own `gateway.tls.cert`). Host names are checked."""
    context = ssl.create_default_context()
    if cafile is not None:
        context.load_verify_locations(cafile=cafile)
    if pinned is not None:
        context.load_verify_locations(cafile=pinned)
        # A leaf (or an intermediate) in the trust store ends the chain there.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
