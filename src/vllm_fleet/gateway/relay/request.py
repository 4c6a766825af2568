"""A client request as the relay parses it, and the limits it is held to.

`Request` collects what the gateway decides on (method, target, Content-Type, the keys)
and the header lines it forwards, built as llhttp reports each header; `HEADER_KIND`
says which headers are looked at or dropped (hop-by-hop). `Reject` ends a request
with an answer and closes the connection.

Tracing: every request has an id (`Request.request_id`), the client's `X-Request-Id` when
it is sane, else one made here; the engine gets it as `X-Request-Id` (vLLM takes that
header as its own request id) and every answer carries it. `traceparent` and `tracestate`
go on to the engine as they came; `trace_id` reads the trace id of a well-formed
traceparent, for the access log.
"""

from __future__ import annotations

import re
from random import getrandbits
from urllib.parse import unquote

import httptools

from vllm_fleet.gateway.errors import Reply, error_reply
from vllm_fleet.gateway.keys import Client
from vllm_fleet.gateway.limits import Ticket
from vllm_fleet.gateway.relay import wire
from vllm_fleet.gateway.routing import remove_dot_segments
from vllm_fleet.gateway.usage import Meter

MAX_URL = 8192  # bytes of request target (nginx's order of size)
MAX_HEAD = 32768  # bytes of header names and values in one request
MAX_HEADERS = 128  # header lines in one request
MAX_REQUEST_ID = 128  # bytes of a client's X-Request-Id kept as the request's id
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # always sent with a Content-Length

# A Host header's value: uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2); an IP literal
# in brackets, or a reg-name (unreserved, sub-delims, percent-encoded), possibly empty.
HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Za-z:._~!$&'()*+,;=-]+\]|[0-9A-Za-z._~!$&'()*+,;=%-]*)(?::[0-9]*)?"
)


class Reject(Exception):
    """A request the server answers with `reply` and then closes the connection."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class Request:
    """One request as parsed: what the gateway decides on, and the header lines it
    forwards (built as the headers arrive, hop-by-hop ones left out)."""

    __slots__ = (
        "_request_id",
        "api_key",
        "authorization",
        "authorized",
        "began",
        "body",
        "bytes_out",
        "chunked",
        "client",
        "complete",
        "connection",
        "content_type",
        "continued",
        "deployment",
        "error",
        "expect",
        "first_body",
        "first_byte",
        "forwarded_for",
        "h2c_offer",
        "head_size",
        "header_count",
        "headers_done",
        "host",
        "hosts",
        "http11",
        "keep_alive",
        "length",
        "lines",
        "meter",
        "method",
        "request_id_sent",
        "responded",
        "status",
        "style",
        "ticket",
        "traceparent",
        "upgrade",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.upgrade: bytes | None = None
        self.chunked = False
        self.h2c_offer = False  # Upgrade: h2c on a bodiless request: ignored (RFC 9110 7.8)
        # The header lines to forward to the engine, four parts each: name, ": ", value,
        # CRLF (joined once, with the rest of the head).
        self.lines: list[bytes] = []
        self.body = bytearray()
        self.method = "GET"
        self.http11 = True
        self.keep_alive = True
        self.complete = False
        self.headers_done = False
        self.head_size = 0
        self.header_count = 0
        self.hosts = 0
        self.content_type: str | None = None
        self.authorization: str | None = None
        self.api_key: str | None = None
        self.authorized = False  # its key was checked at the head
        self.host = b""
        self.forwarded_for: bytes | None = None
        self.connection: bytes | None = None
        self.length: bytes | None = None
        self.expect: bytes | None = None
        self.continued = False
        self.error: Reply | None = None  # answer this, then close
        self.began = 0.0  # time.monotonic() of the read its head began in
        # What accounting.py reads once the request is answered:
        self.client: Client | None = None  # the key it came with (gateway.keys)
        self.deployment: str | None = None  # where it was routed
        self.style: str | None = None  # path, azure, openai
        self.status = 0  # of the answer's head, once sent
        self.responded = False  # an engine began answering it
        self.first_byte = 0.0  # time.monotonic() of the answer's head
        self.first_body = 0.0  # of its first body bytes (a stream's first event: TTFT)
        self.bytes_out = 0  # bytes of the answer written to the client, head included
        self.ticket: Ticket | None = None  # its hold on the key's limits
        self.meter: Meter | None = None  # reads the answer's usage
        # Tracing: the client's X-Request-Id and traceparent as sent (b"" when sent twice),
        # and the request's id once decided.
        self.request_id_sent: bytes | None = None
        self.traceparent: bytes | None = None
        self._request_id: bytes | None = None

    @property
    def request_id(self) -> bytes:
        """This request's id, decided when first asked: the client's X-Request-Id when it
        sent one sane id (visible ASCII, 1 to 128 bytes), else a new one."""
        rid = self._request_id
        if rid is None:
            sent = self.request_id_sent
            rid = self._request_id = sent if sent is not None and sane_id(sent) else new_id()
        return rid

    def trace_id(self) -> str | None:
        """The trace id of the client's traceparent (None: none, or not well-formed)."""
        return trace_id(self.traceparent) if self.traceparent is not None else None

    @property
    def expect_continue(self) -> bool:
        # Only once the whole head is in and checked (on_headers_complete): a head still
        # arriving may yet be refused, or expect something else (417), or be HTTP/1.0.
        return self.expect is not None and self.headers_done

    def add_header(self, name: bytes, value: bytes) -> None:
        """Take one header line: forwarded as it came, or kept for the gateway to decide
        on (Host, Content-Length, the keys, ...), or dropped (hop-by-hop)."""
        kind = HEADER_KIND.get(name.lower())
        if kind is None:
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == CTYPE:
            if self.content_type is not None:
                raise Reject(repeated_header("Content-Type"))
            self.content_type = value.decode("latin-1")
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == HOST:
            self.host = value
            self.hosts += 1
        elif kind == LENGTH:
            self.length = value
        elif kind == AUTH:
            if self.authorization is not None:
                raise Reject(repeated_header("Authorization"))
            self.authorization = value.decode("latin-1")
            self.lines += (name, b": ", value, b"\r\n")
        elif kind == API_KEY:
            if self.api_key is not None:
                raise Reject(repeated_header("api-key"))
            self.api_key = value.decode("latin-1")
        elif kind == XFF:
            prior = self.forwarded_for
            self.forwarded_for = prior + b", " + value if prior else value
        elif kind == CONNECTION:
            self.connection = value
        elif kind == EXPECT:
            self.expect = value
        elif kind == UPGRADE:
            self.upgrade = value
        elif kind == TE:
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings != [b"chunked"]:
                # llhttp takes any codings that end in chunked (`gzip, chunked`); the
                # engine would get a body still in a coding nobody names (RFC 9112 6.1).
                raise Reject(unsupported_coding(value, chunked_last=codings[-1] == b"chunked"))
            self.chunked = True
        elif kind == REQUEST_ID:
            # Sent on as the request's id (engine_headers); sent twice, neither is kept.
            self.request_id_sent = value if self.request_id_sent is None else b""
        elif kind == TRACE:
            self.traceparent = value if self.traceparent is None else b""
            self.lines += (name, b": ", value, b"\r\n")


# Request headers the relay looks at (lower-case name -> what it is); all others are
# forwarded as they came.
HOST, LENGTH, CONNECTION, EXPECT, API_KEY, XFF, CTYPE, AUTH, UPGRADE, TE, DROP = range(11)
REQUEST_ID, TRACE = range(11, 13)
HEADER_KIND = {name: DROP for name in wire.REQUEST_DROP} | {
    b"host": HOST,
    b"content-length": LENGTH,
    b"connection": CONNECTION,
    b"expect": EXPECT,
    b"api-key": API_KEY,
    b"x-forwarded-for": XFF,
    b"x-forwarded-proto": DROP,
    b"x-real-ip": DROP,
    b"x-forwarded-host": DROP,
    b"content-type": CTYPE,
    b"authorization": AUTH,
    b"upgrade": UPGRADE,
    b"transfer-encoding": TE,
    b"x-request-id": REQUEST_ID,
    b"traceparent": TRACE,
}


def engine_headers(request: Request, peer: bytes, body: bytes, scheme: bytes = b"http") -> bytes:
    """The header lines for the engine (less Host, which depends on the engine): those
    forwarded, the key as a bearer token, the X-Forwarded set, the request's id, the
    body's length."""
    lines = request.lines  # name, ": ", value, CRLF for each header forwarded
    if request.connection is not None:
        # Headers the client's `Connection` names are for this hop only.
        listed = wire.connection_tokens(request.connection)
        if listed:
            kept = [i for i in range(0, len(lines), 4) if lines[i].lower() not in listed]
            lines = [part for i in kept for part in lines[i : i + 4]]
    if request.api_key and request.authorization is None:
        # Azure clients send their key as `api-key`; engines started with --api-key
        # expect a bearer token.
        lines.append(b"Authorization: Bearer %s\r\n" % request.api_key.encode("latin-1"))
    prior = request.forwarded_for
    lines.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n"
        b"X-Real-IP: %s\r\nX-Request-Id: %s\r\n"
        % (prior + b", " + peer if prior else peer, scheme, request.host, peer, request.request_id)
    )
    if body or request.method in BODY_METHODS:
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    else:
        lines.append(b"\r\n")
    return b"".join(lines)


# ---------------------------------------------------------------- tracing


def sane_id(value: bytes) -> bool:
    """Whether a client's X-Request-Id can be the request's id: 1 to 128 bytes of visible
    ASCII. llhttp has refused control characters and DEL in a header value already;
    left are space, tab and bytes over 0x7F."""
    return (
        0 < len(value) <= MAX_REQUEST_ID and value.isascii() and 32 not in value and 9 not in value
    )


def new_id() -> bytes:
    """A new request id: 32 hex digits (128 random bits, as vLLM's own uuid4().hex), from
    the process's Mersenne Twister (no system call; an id is no secret)."""
    return b"%032x" % getrandbits(128)


_HEX = b"0123456789abcdef"


def trace_id(traceparent: bytes) -> str | None:
    """The trace id of a W3C traceparent `version-traceid-parentid-flags` (2, 32, 16 and
    2 lower-case hex digits; a version above 00 may add `-...`), None when it is not
    well-formed: version ff, an all-zero trace or parent id, anything else."""
    value = traceparent
    size = len(value)
    if size < 55 or value[2] != 45 or value[35] != 45 or value[52] != 45:  # 45: "-"
        return None
    version = value[:2]
    if version == b"ff" or (size > 55 and (version == b"00" or value[55] != 45)):
        return None
    digits = value[:2] + value[3:35] + value[36:52] + value[53:55]
    if digits.translate(None, _HEX):
        return None
    trace = value[3:35]
    if trace == b"0" * 32 or value[36:52] == b"0" * 16:
        return None
    return trace.decode("ascii")


# ---------------------------------------------------------------- the relay's own refusals


def repeated_header(name: str) -> Reply:
    """A header the gateway decides on came twice: the engine might read the other one
    (which key, which body type), so the request is refused."""
    return error_reply(
        400, f"the request has more than one {name} header; send it once", "invalid_request", name
    )


def over_limit(limit: int) -> Reply:
    return error_reply(
        503,
        f"the gateway serves {limit} connections at once and is at that limit; retry "
        "shortly (gateway.max_connections, or the open-files limit, sets it)",
        "too_many_connections",
        headers={"Retry-After": "1"},
    )


def unsupported_coding(value: bytes, chunked_last: bool) -> Reply:
    """RFC 9112 6.1 and 6.3: a coding the server does not know is a 501; a request whose
    codings do not end in chunked has no length at all, a 400."""
    return error_reply(
        501 if chunked_last else 400,
        f"the gateway takes no transfer coding but chunked (Transfer-Encoding: "
        f"{value.decode('latin-1')[:100]}); send the body as it is, with Content-Length "
        "or Transfer-Encoding: chunked",
        "unsupported_transfer_coding",
    )


def internal_error() -> Reply:
    return error_reply(500, "internal gateway error; see the gateway log", "internal_error")


def decode_target(target: bytes) -> tuple[str, str, bool] | Reply:
    """A request target as the gateway routes it: the path, percent-decoded once and with
    its dot segments removed; the query as sent; and whether the path must be encoded
    again for the engine (it was decoded or normalised). The 400 for garbage."""
    if target[:1] == b"/":  # origin form, as clients send it
        target, _, _ = target.partition(b"#")  # a fragment is never sent on
        raw_path, _, raw_query = target.partition(b"?")
    else:  # absolute form (http://host/path), or garbage
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return error_reply(400, "the request target is not a valid URL", "invalid_url")
        raw_path, raw_query = url.path or b"/", url.query or b""
    path = raw_path.decode("latin-1")
    requote = False
    if "%" in path:
        # Decoded once to route; bytes that are not UTF-8 survive as surrogates, so
        # core.route encodes them back as they came (%FF stays %FF).
        path = unquote(raw_path.decode("utf-8", "surrogateescape"), errors="surrogateescape")
        requote = True
    if "/." in path:
        normal = remove_dot_segments(path)
        requote = requote or normal != path
        path = normal
    return path, raw_query.decode("latin-1"), requote
