"""HTTP/1.1 bytes the relay writes: status lines, header blocks, chunk framing.

Parsing is never done here (llhttp, through httptools, parses both directions); this
module only serializes heads the relay builds and holds the header rules of a proxy.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from vllm_fleet.gateway.errors import Reply

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus those the
# relay recomputes itself. Names are lower-case bytes, as compared.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
REQUEST_DROP = HOP_BY_HOP | {b"api-key", b"expect"}
RESPONSE_DROP = HOP_BY_HOP | {b"server"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
RELAY_HEADERS = b"X-Accel-Buffering: no\r\n"

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()}
_date_second = 0
_date_line = b""


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))
    return line


def date_line() -> bytes:
    """`Date: ...\\r\\n` for now, formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


def reply_bytes(reply: Reply, *, head_only: bool, connection: bytes, request_id: bytes) -> bytes:
    """A whole response for a reply the gateway makes itself; `connection` is its
    Connection header line, or nothing; `request_id` its X-Request-Id."""
    parts = [
        status_line(reply.status),
        date_line(),
        b"Content-Type: " + reply.content_type.encode("latin-1") + b"\r\n",
        b"Content-Length: %d\r\n" % len(reply.body),
        b"X-Request-Id: ",
        request_id,
        b"\r\n",
    ]
    for name, value in reply.headers:
        parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    parts.append(connection + b"\r\n")
    if not head_only:
        parts.append(reply.body)
    return b"".join(parts)


def one_request_id(lines: list[bytes], request_id: bytes) -> None:
    """Make an engine's answer (its header lines, `name: value\\r\\n` each) carry one
    X-Request-Id, `request_id`: added, as engines do not send one unless asked (vLLM
    --enable-request-id-headers, which echoes the one it was sent). An engine's own is
    kept when it is the same; when it is not, the gateway's wins: the id the client sent,
    or was told, and the access log's."""
    for line in lines:
        if line[0] | 0x20 == 0x78 and line[:14].lower() == b"x-request-id: ":  # 0x78: x
            break
    else:
        lines.append(b"X-Request-Id: %s\r\n" % request_id)
        return
    # The engine sent one (or more): one line is left, its own if the same, else ours.
    own = [line for line in lines if line[:14].lower() == b"x-request-id: "]
    same = [line for line in own if line[14:-2] == request_id]
    lines[:] = [line for line in lines if line not in own]
    lines.append(same[0] if same else b"X-Request-Id: %s\r\n" % request_id)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a `Connection` header lists (besides keep-alive / close)."""
    return {t.strip().lower() for t in value.split(b",")} - {b"", b"keep-alive", b"close"}
