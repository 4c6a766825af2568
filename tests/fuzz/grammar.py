"""The fuzzer's grammar: hypothesis strategies that build raw HTTP/1.1 request bytes, and
say for each request what the gateway may do with it.

A `Case` is one client connection: requests (`Req`) pipelined on it, how the bytes are
written (`splits`: several writes, so requests and heads straddle reads), and whether
the client closes without reading. Each request is built from its parts (method, target,
version, headers, framing, body), each valid or hostile, and knows its `fate`:

- PASS: well-framed, maybe odd (unknown routes, odd bodies, obs-text, duplicate
  Authorization...). The gateway may answer it itself or forward it, but what it forwards
  is this request, whole: its body exactly as framed (`body`), the JSON `model` aside.
- REFUSE: ambiguous or broken framing, a smuggling vector, or a head the gateway promises
  to refuse (CL+TE, bad Content-Length, unknown transfer codings, obs-fold, bare CR/LF,
  two Hosts, a bad Host...). Never forwarded, and nothing after it on the connection.
- PARTIAL: the client stops sending inside it (mid-head or mid-body) and closes.
  Never forwarded.

Requests carry `X-Fuzz-Id: <placeholder><n>`; the runner puts the case's number in the
placeholder (same width, so no framing changes), and the engine's records name the request
they are. Requests hidden inside bodies carry ids too (`smuggled`): the engine must never
see them.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace

from hypothesis import strategies as st

from tests.fuzz.bodies import BODIES
from tests.fuzz.filler import (
    SEEDS,
    field_values,
    ints,
    path_segments,
    percent_encoded,
    pick,
    tokens,
)
from tests.fuzz.fleet import MAX_BODY
from tests.fuzz.upstream import ANSWERS

PLACEHOLDER = b"@CASE@@@"  # 8 bytes; the runner writes the case number (%08x) there


def rare(draw: st.DrawFn, options: int, out_of: int) -> int:
    """0 most of the time, else one of 1..options (each about 1 in `out_of`). Hypothesis
    shrinks towards 0, so a shrunk case keeps only the odd parts that matter."""
    n = draw(ints(0, out_of - 1))
    return max(0, n - (out_of - 1 - options))


class Fate(enum.Enum):
    PASS = "pass"
    REFUSE = "refuse"
    PARTIAL = "partial"


@dataclass(frozen=True)
class Req:
    """One request on the wire, and what the gateway may do with it."""

    rid: bytes | None  # X-Fuzz-Id (with the placeholder); None for bytes that are no request
    wire: bytes
    method: str  # as sent (the answer to HEAD is a head alone)
    fate: Fate
    body: bytes = b""  # the body as framed: what the engine must receive (`model` aside)
    answer: str = "length"  # how the engine answers it (X-Fuzz-Answer)
    http10: bool = False
    expect: bool = False  # sent `Expect: 100-continue`: a 100 may precede the answer
    closes: bool = False  # Connection: close, or HTTP/1.0: nothing after it is processed
    smuggled: tuple[bytes, ...] = ()  # ids of requests hidden in its body
    notes: tuple[str, ...] = ()  # the grammar's choices, for the figures


@dataclass(frozen=True)
class Case:
    reqs: tuple[Req, ...]
    splits: tuple[int, ...] = ()  # offsets where the bytes are cut into separate writes
    early_close: bool = False  # close right after writing, reading nothing
    notes: tuple[str, ...] = field(default=())

    @property
    def wire(self) -> bytes:
        return b"".join(r.wire for r in self.reqs)


# ---------------------------------------------------------------- request line

METHODS = ["POST", "POST", "POST", "GET", "GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"]
BODY_METHODS = {"POST", "PUT", "PATCH"}
DEPLOYMENTS = [
    "raw", "chat", "raw", "chat", "down", "raw", "%72aw", "ra%77", "chat", "nope", "RAW",
    "raw-alias", "", "raw",
]  # fmt: skip
ENDPOINTS = [
    "v1/chat/completions", "v1/completions", "v1/embeddings", "v1/models", "health",
    "v1/audio/transcriptions", "", "v1/", "x/y/z",
]  # fmt: skip
AZURE_ENDPOINTS = ["chat/completions", "completions", "embeddings", "", "x"]
OWN = ["/health", "/health?ready=1", "/metrics", "/v1/models", "/fleet/status", "/openai/models"]
PCHARS = path_segments()


@st.composite
def target(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """A request target, a label, and whether it is malformed (a REFUSE)."""
    style = pick(draw, ["path", "azure", "openai", "path", "own", "path", "azure", "junk", "path"])
    if style == "path":
        path = f"/{pick(draw, DEPLOYMENTS)}/{pick(draw, ENDPOINTS)}"
    elif style == "azure":
        dep = pick(draw, DEPLOYMENTS)
        path = f"/openai/deployments/{dep}/{pick(draw, AZURE_ENDPOINTS)}"
        if draw(ints(0, 4)):
            path += "?api-version=" + pick(draw, ["2024-10-21", "", "x"])
    elif style == "openai":
        path = pick(draw, ["/v1/", "/openai/v1/"])
        path += pick(draw, [*ENDPOINTS[:4], "", "models/raw"])
    elif style == "own":
        path = pick(draw, OWN)
    else:
        path = "/" + "/".join(draw(st.lists(PCHARS, max_size=4)))
    mutation = rare(draw, 7, 40)
    malformed = False
    if mutation == 1:
        path = percent_encoded(path, draw(SEEDS))
    elif mutation == 7:
        path = path.replace("/", pick(draw, ["/./", "/../", "//", "/%2e%2e/", "/%2F"]), 1)
    elif mutation == 2:
        path += pick(draw, ["?", "#frag", "?a=1&b=%0d%0a", "?x=%zz", "/..", "/."])
    elif mutation == 3:
        path = pick(draw, ["http://evil", "http://127.0.0.1:1", "HTTP://t"]) + path
    elif mutation == 4:
        path = pick(draw, ["*", "raw:443", "//raw/v1/models", "?x", "%2Fraw/v1/x"])
    elif mutation == 5:
        path += "/" + "a" * pick(draw, [8200, 9000])  # past the URL limit
    elif mutation == 6:
        # Bytes a target may not hold: spaces, controls, non-ASCII.
        bad = pick(draw, [" ", "\t", "\x00", "\x01", "\x7f", "\x80", "\xff", '"', "<"])
        at = draw(ints(1, len(path)))
        path = path[:at] + bad + path[at:]
        # Whitespace after the target is only a wider separator, which RFC 9112 3 lets a
        # server read as one; inside it, it makes a request line of four words.
        inside = at < len(path) - 1
        malformed = bad in ("\x00", "\x01", "\x7f") or (bad in (" ", "\t") and inside)
    return path.encode("latin-1"), style, malformed


VERSIONS_ODD = [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1", b"http/1.1", b"HTTP/1.1 x",
                b"HTTP/1.10", b"HTTP/11", b"HTTPS/1.1", b""]  # fmt: skip


# ---------------------------------------------------------------- headers

RESERVED_NAMES = {
    "host", "content-length", "transfer-encoding", "x-fuzz-id", "x-fuzz-answer", "connection",
    "expect", "upgrade", "content-type", "authorization", "api-key",
}  # fmt: skip
COMMON_NAMES = ["User-Agent", "Accept", "X-Request-Id", "OpenAI-Organization", "traceparent"]
NAMES = st.sampled_from(COMMON_NAMES) | tokens().filter(lambda n: n.lower() not in RESERVED_NAMES)
VALUES = field_values()
HOSTS = [b"t", b"127.0.0.1:8080", b"[::1]:80", b"example.com", b"", b"xn--bcher-kva.example:1"]
BAD_HOSTS = [b"a b", b"a/b", b"a@b", b"t:80:80", b"[::1", b"a\\b", b"t?x", b"<t>"]
CONTENT_TYPES = [
    b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON",
    b"application/vnd.api+json", b"text/plain", b"application/octet-stream",
    b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded", b"json", b"",
]  # fmt: skip


@dataclass
class Head:
    """A request head being built: header lines, and what they do to the request."""

    lines: list[bytes] = field(default_factory=list)
    refuse: bool = False
    closes: bool = False
    expect: bool = False
    notes: list[str] = field(default_factory=list)

    def add(self, name: bytes, value: bytes) -> None:
        self.lines.append(name + b": " + value + b"\r\n")

    def note(self, label: str, refuse: bool = False) -> None:
        self.notes.append(label)
        self.refuse = self.refuse or refuse


HOSTILE_HEADERS = (
    "obs-fold", "space-before-colon", "bare-lf", "bare-cr", "nul", "ctl", "bad-name", "no-colon",
    "empty-name", "huge-value", "many", "obs-text", "dup-auth", "dup-ctype", "dup-api-key", "hop",
    "xff", "leading-space",
)  # fmt: skip


def _hostile_header(draw: st.DrawFn, head: Head) -> None:
    """One hostile header line (or a hostile form of one)."""
    kind = pick(draw, HOSTILE_HEADERS)
    name = draw(NAMES).encode()
    if kind == "obs-fold":
        head.lines.append(b"%s: one\r\n%stwo\r\n" % (name, pick(draw, [b" ", b"\t"])))
        head.note(kind, refuse=True)
    elif kind == "space-before-colon":
        head.lines.append(b"%s%s: v\r\n" % (name, pick(draw, [b" ", b"\t"])))
        head.note(kind, refuse=True)
    elif kind == "bare-lf":
        head.lines.append(b"%s: a\nInjected: yes\r\n" % name)
        head.note(kind, refuse=True)
    elif kind == "bare-cr":
        head.lines.append(b"%s: a\rInjected: yes\r\n" % name)
        head.note(kind, refuse=True)
    elif kind == "nul":
        head.lines.append(b"%s: a\x00b\r\n" % name)
        head.note(kind, refuse=True)
    elif kind == "ctl":
        ctl = pick(draw, [b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1f", b"\x7f"])
        head.lines.append(b"%s: a%sb\r\n" % (name, ctl))
        head.note(kind)  # the engine's strict check says whether it got through
    elif kind == "bad-name":
        bad = pick(draw, [b"(", b")", b"/", b"[", b"{", b"\x01", b"\xe9", b'"', b"@"])
        head.lines.append(b"X%sY: v\r\n" % bad)
        head.note(kind)
    elif kind == "no-colon":
        head.lines.append(b"%s\r\n" % name)
        head.note(kind)
    elif kind == "empty-name":
        head.lines.append(b": v\r\n")
        head.note(kind)
    elif kind == "huge-value":
        size = pick(draw, [4000, 20000, 33000, 70000])
        head.add(name, b"v" * size)
        head.note(kind)
    elif kind == "many":
        count = pick(draw, [50, 127, 129, 400])
        head.lines.extend(b"X-M%d: v\r\n" % i for i in range(count))
        head.note(kind)
    elif kind == "obs-text":
        head.add(name, b"caf\xe9 \x80\xff")
        head.note(kind)
    elif kind == "dup-auth":
        head.add(b"Authorization", b"Bearer one")
        head.add(b"authorization", b"Bearer two")
        head.note(kind)
    elif kind == "dup-ctype":
        head.add(b"Content-Type", b"application/json")
        head.add(b"Content-Type", b"text/plain")
        head.note(kind)
    elif kind == "dup-api-key":
        head.add(b"api-key", b"one")
        head.add(b"API-KEY", b"two")
        head.note(kind)
    elif kind == "hop":
        head.add(b"Connection", b"keep-alive, X-Hop, te")
        head.add(b"X-Hop", b"secret")
        head.add(b"TE", b"trailers")
        head.add(b"Keep-Alive", b"timeout=5")
        head.add(b"Proxy-Connection", b"keep-alive")
        head.note(kind)
    elif kind == "xff":
        head.add(b"X-Forwarded-For", pick(draw, [b"6.6.6.6", b"1.1.1.1, 2.2.2.2", b""]))
        head.add(b"X-Real-IP", b"6.6.6.6")
        head.note(kind)
    else:  # leading-space: a first header line that starts with whitespace
        head.lines.insert(0, b" %s: v\r\n" % name)
        head.note(kind, refuse=True)


# ---------------------------------------------------------------- framing


CHUNK_FAULTS = (
    "size-not-hex", "size-negative", "size-overflow", "no-crlf", "data-too-long", "bare-lf",
    "space-in-size", "ext-ctl", "trailer-cl",
)  # fmt: skip


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes, hostile: bool = False) -> tuple[bytes, bool, str]:
    """`body` in chunked coding: the bytes, whether they are malformed, and a label."""
    rng = random.Random(draw(SEEDS))
    cuts = sorted(rng.randint(0, len(body)) for _ in range(rng.randint(0, 4)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    pieces = [p for p in pieces if p]
    out = []
    for piece in pieces:
        size = b"%x" % len(piece)
        style = rare(draw, 3, 12)
        if style == 1:
            size = size.upper()
        elif style == 2:
            size = b"000" + size
        elif style == 3:
            size += pick(draw, [b";a=b", b';q="x y"', b";flag", b";a=b;c=d"])
        out.append(size + b"\r\n" + piece + b"\r\n")
    last = b"0" + (b";end=1" if rare(draw, 1, 6) else b"") + b"\r\n"
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(draw(ints(0, 2))))
    wire = b"".join(out) + last + trailers + b"\r\n"
    if not hostile or not out:
        return wire, False, "chunked"
    # One hostile form of the chunked framing.
    kind = pick(draw, CHUNK_FAULTS)
    first = out[0]
    size, _, rest = first.partition(b"\r\n")
    if kind == "size-not-hex":
        first = b"zz\r\n" + rest
    elif kind == "size-negative":
        first = b"-" + first
    elif kind == "size-overflow":
        first = b"fffffffffffffffffff" + first
    elif kind == "no-crlf":
        first = first[:-2] + b"XX"
    elif kind == "data-too-long":
        first = first[:-2] + b"extra\r\n"
    elif kind == "bare-lf":
        first = size + b"\n" + rest
    elif kind == "space-in-size":
        first = size + b" \r\n" + rest  # BWS before the line end: no extension follows
    elif kind == "ext-ctl":
        first = size + b";a=\x01\r\n" + rest
    else:  # a trailer that would reframe the message, were trailers merged into the head
        return wire[:-2] + b"Content-Length: 5\r\n\r\n", False, "trailer-cl"
    return first + b"".join(out[1:]) + last + trailers + b"\r\n", True, "chunked-" + kind


def _smuggled_request(rid: bytes) -> bytes:
    return b"GET /raw/v1/models HTTP/1.1\r\nHost: t\r\nX-Fuzz-Id: %s\r\n\r\n" % rid


@st.composite
def request(draw: st.DrawFn, index: int) -> tuple[Req, Req | None]:
    """Request number `index` of its case, and the junk that follows it (if its body
    overruns its Content-Length)."""
    rid = PLACEHOLDER + b"r%d" % index
    notes: list[str] = []
    method = pick(draw, METHODS)
    path, style, bad_target = draw(target())
    notes.append("target-" + style)
    version = b"HTTP/1.1"
    line_refuse = bad_target
    odd_line = rare(draw, 5, 80)
    if odd_line == 1:
        method = pick(draw, ["get", "FOO", "M-SEARCH", "TRACE", "PROPFIND"])
        notes.append("method-odd")
    elif odd_line == 2:
        method = pick(draw, ["G T", "GE\x00T", "", "GÉT", "POST\t"])
        notes.append("method-bad")
        line_refuse = True
    elif odd_line == 3:
        version = pick(draw, VERSIONS_ODD)
        notes.append("version-odd")
        line_refuse = True
    elif odd_line == 4:
        method, path = "CONNECT", b"raw:443"
        notes.append("connect")
        line_refuse = True
    elif odd_line == 5:
        version = b"HTTP/1.0"
        notes.append("http10")
    if line_refuse and method == "HEAD":
        method = "GET"  # the answer to a line nobody can read is not known to be a head
    http10 = version == b"HTTP/1.0"
    request_line = b"%s %s %s\r\n" % (method.encode("latin-1"), path, version)
    if version == b"":
        request_line = b"%s %s\r\n" % (method.encode("latin-1"), path)

    head = Head()
    head.refuse = line_refuse
    answer = pick(draw, ANSWERS) if rare(draw, 1, 3) else "length"
    host = rare(draw, 3, 80)
    if host == 1:
        head.note("no-host", refuse=not http10)
    elif host == 2:
        head.add(b"Host", b"t")
        head.add(b"Host", b"u")
        head.note("two-hosts", refuse=True)
    elif host == 3:
        head.add(b"Host", pick(draw, BAD_HOSTS))
        head.note("bad-host", refuse=True)
    else:
        head.add(b"Host", pick(draw, HOSTS))
    head.add(b"X-Fuzz-Id", rid)
    head.add(b"X-Fuzz-Answer", answer.encode())
    ctype_choice = rare(draw, 2, 10)
    if ctype_choice == 0:
        head.add(b"Content-Type", b"application/json")
    elif ctype_choice == 1:
        head.add(b"Content-Type", pick(draw, CONTENT_TYPES))
    for _ in range(draw(ints(0, 3))):
        head.add(draw(NAMES).encode(), draw(VALUES).encode("latin-1"))
    if rare(draw, 1, 4):
        head.add(b"Authorization", b"Bearer " + draw(VALUES).encode("latin-1"))
    conn = rare(draw, 3, 30)
    if conn == 1:
        head.add(b"Connection", b"close")
        head.closes = True
        head.note("connection-close")
    elif conn == 2:
        head.add(b"Connection", b"keep-alive")
        head.note("connection-keep-alive")
    elif conn == 3:
        head.add(b"Connection", b"Upgrade")
        head.add(b"Upgrade", pick(draw, [b"h2c", b"websocket", b"foo/1"]))
        head.note("upgrade")
    expect = rare(draw, 2, 30)
    if expect == 1:
        head.add(b"Expect", b"100-continue")
        head.expect = not http10
        head.note("expect-100")
    elif expect == 2:
        head.add(b"Expect", b"something-else")
        head.note("expect-odd")
    if rare(draw, 1, 10):
        _hostile_header(draw, head)
    if http10 and b"Connection: keep-alive\r\n" not in head.lines:
        head.closes = True

    # The body and its framing.
    body = b""
    if method in BODY_METHODS or rare(draw, 1, 10):
        body, kind = draw(BODIES)
        notes.append("body-" + kind)
        if rare(draw, 1, 80):  # over the gateway's limit, or just under it
            body = body + b" " * (MAX_BODY + pick(draw, [-len(body) - 10, 1, 4000]))
            body = body[: MAX_BODY + 4000]
            notes.append("body-big")
        if rare(draw, 1, 30):
            # A request hidden in the body: data, never a request of its own.
            smuggled = (PLACEHOLDER + b"s%d" % index,)
            body += _smuggled_request(smuggled[0])
        else:
            smuggled = ()
    else:
        smuggled = ()
    framing = rare(draw, 10, 40)
    fate = Fate.REFUSE if head.refuse else Fate.PASS
    junk: Req | None = None
    payload = body
    lines = head.lines
    if framing == 0 or (not body and framing < 6):
        if body or method in BODY_METHODS:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        notes.append("length")
    elif framing < 5 or framing == 10:
        payload, broken, label = draw(chunked_body(body, hostile=framing == 4))
        lines.append(b"Transfer-Encoding: chunked\r\n")
        notes.append(label)
        if broken:
            fate = Fate.REFUSE
    elif framing == 5:
        # Leading zeros, spaces around it, a list of one value (RFC 9110 8.6 lets a
        # recipient take the list or refuse it): all mean this length, or are refused.
        n = len(body)
        value = pick(draw, [b"%03d" % n, b" %d " % n, b"%d, %d" % (n, n)])
        lines.append(b"Content-Length: " + value + b"\r\n")
        notes.append("length-odd-form")
    elif framing == 6:
        n = len(body)
        value = pick(draw, [b"+%d" % n, b"-%d" % n, b"%da" % n, b"0x%x" % n, b"", b"%d %d" % (n, n),
                             b"1" + b"0" * 20, b"%d.0" % n])  # fmt: skip
        lines.append(b"Content-Length: " + value + b"\r\n")
        notes.append("length-bad")
        fate = Fate.REFUSE
    elif framing == 7:
        kind = pick(draw, ["cl-te", "te-cl", "two-cl", "two-cl-same"])
        chunked, _, _ = draw(chunked_body(body))
        if kind == "cl-te":
            lines += [b"Content-Length: %d\r\n" % len(body), b"Transfer-Encoding: chunked\r\n"]
            payload = chunked
        elif kind == "te-cl":
            lines += [b"Transfer-Encoding: chunked\r\n", b"Content-Length: %d\r\n" % len(chunked)]
            payload = chunked
        elif kind == "two-cl":
            lines += [
                b"Content-Length: %d\r\n" % len(body),
                b"Content-Length: %d\r\n" % (len(body) + 7),
            ]
        else:
            lines += [b"Content-Length: %d\r\n" % len(body)] * 2
        notes.append(kind)
        if kind != "two-cl-same":
            fate = Fate.REFUSE
    elif framing == 8:
        coding = pick(draw, [b"gzip, chunked", b"chunked, identity", b"identity", b"xchunked",
                             b"chunked, chunked", b"deflate", b"Chunked", b"chunked "])  # fmt: skip
        chunked, _, _ = draw(chunked_body(body))
        lines.append(b"Transfer-Encoding: " + coding + b"\r\n")
        payload = chunked if b"chunked" in coding.lower() else body
        notes.append("te-" + coding.decode().strip().replace(", ", "+").lower())
        if coding.strip().lower() != b"chunked":
            fate = Fate.REFUSE
    else:
        # The body overruns its Content-Length: what follows is the next "request".
        lines.append(b"Content-Length: %d\r\n" % len(body))
        junk = Req(
            rid=None, wire=b"\x01junk after the body\r\n\r\n", method="GET", fate=Fate.REFUSE
        )
        notes.append("length-overrun")
    # An Upgrade is declined by answering over HTTP/1.1 (h2c on a bodiless request) or
    # refused, after which the gateway reads no more.
    has_te = any(line.lower().startswith(b"transfer-encoding") for line in lines)
    h2c = b"Upgrade: h2c\r\n" in lines and not body and not has_te
    upgrade_refused = "upgrade" in head.notes and not h2c
    order = draw(st.permutations(range(len(lines)))) if rare(draw, 1, 5) else None
    if order is not None and not any(line[:1] in b" \t" for line in lines):
        lines = [lines[i] for i in order]
    wire = request_line + b"".join(lines) + b"\r\n" + payload
    req = Req(
        rid=rid,
        wire=wire,
        method=method,
        fate=fate,
        body=body,
        answer=answer,
        http10=http10,
        expect=head.expect,
        closes=head.closes or upgrade_refused or method == "CONNECT",
        smuggled=smuggled,
        notes=(*notes, *head.notes),
    )
    return req, junk


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One client connection's worth of requests, and how they are sent."""
    count = [1, 2, 3, 4, 6, 10][rare(draw, 5, 14)]
    reqs: list[Req] = []
    for index in range(count):
        req, junk = draw(request(index))
        reqs.append(req)
        if junk is not None:
            reqs.append(junk)
            break
        if req.http10 or req.fate is Fate.REFUSE:
            break  # nothing after these is read as HTTP/1.1 requests by the gateway
    notes: list[str] = []
    ending = rare(draw, 2, 20)
    if ending == 1:
        # The client stops inside its last request and closes.
        last = reqs[-1]
        cut = max(1, min(len(last.wire) - 1, len(last.wire) * draw(ints(1, 999)) // 1000))
        reqs[-1] = replace(
            last, wire=last.wire[:cut], fate=Fate.PARTIAL, notes=(*last.notes, "cut")
        )
        notes.append("client-cut")
    early_close = ending == 2
    if early_close:
        notes.append("early-close")
    total = sum(len(r.wire) for r in reqs)
    splits: tuple[int, ...] = ()
    if rare(draw, 1, 4) and total > 1:
        rng = random.Random(draw(SEEDS))
        splits = tuple(sorted({rng.randint(1, total - 1) for _ in range(rng.randint(1, 4))}))
        notes.append("split-writes")
    return Case(tuple(reqs), splits, early_close, tuple(notes))
