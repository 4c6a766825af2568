"""The invariants, checked on every case: the client side reads the gateway's answers with
h11 (an independent, strict HTTP/1.1 parser) and a few stricter checks of its own; the
engine side checks each request the recording engine received against the request the
generator sent.

Client side, for every byte the gateway sends:
- it parses as HTTP/1.1 responses, one per request at most, in order, none after a
  `Connection: close`; a 1xx only as `100 Continue` to an HTTP/1.1 `Expect: 100-continue`;
- no 500, ever; an answer the gateway made itself (no `X-Fleet-Upstream`) that is an
  error is the OpenAI envelope `{"error": {"message", "type", "param", "code"}}` with
  `X-Fleet-Error: gateway` and a 4xx, 502, 503 or 504;
- an answer from the engine is the answer to this very request (`X-Fuzz-Got`), and only
  to a request that may be forwarded;
- no Python traceback, exception class name or `NoneType` anywhere.
Engine side, for every request it received: a request the generator sent whole (PASS),
once, not after a request that closes the connection, with its method and its body
exactly as framed (JSON bodies: equal once `model` is the deployment's served name), and
valid HTTP with clean header lines (see upstream.strict_problems).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.fuzz.fleet import SERVED
from tests.fuzz.grammar import Case, Fate, Req
from tests.fuzz.upstream import Seen

IDLE_TIMEOUT = 1.0  # seconds without a byte from the gateway before the client stops reading
GATEWAY_ERRORS = frozenset({400, 401, 403, 404, 405, 413, 414, 417, 431, 501, 502, 503, 504, 505})
UPSTREAMS = frozenset({"raw-0", "chat-0", "chat-1"})
# What must never appear in what the gateway sends: Python's own words.
LEAKS = re.compile(rb"Traceback|(?<![-\w])\w*(?:Error|Exception)\b|NoneType|File \"[^\"]*\.py\"")


class Broken(AssertionError):
    """An invariant does not hold."""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    interim: list[int] = field(default_factory=list)
    complete: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def upstream(self) -> str | None:
        found = self.header(b"x-fleet-upstream")
        return found[0].decode("latin-1") if found else None


@dataclass
class Outcome:
    """What the client saw on one connection."""

    answers: list[Answer] = field(default_factory=list)
    closed: bool = False  # the gateway closed the connection
    reset: bool = False  # ... with a reset
    timed_out: bool = False
    early_close: bool = False
    close_after: int | None = None  # the answer (index) that said Connection: close
    expected: int = 0  # answers the client waited for
    raw: bytearray = field(default_factory=bytearray)

    @property
    def clean(self) -> bool:
        """Every answer the gateway gave was read, whole: the engine's count must match."""
        return not (self.early_close or self.reset or self.timed_out) and all(
            a.complete for a in self.answers
        )


def expected_answers(case: Case) -> int:
    """Answers the client waits for: one per request up to the first that closes the
    connection (a request the client cut short may be answered early, or not at all)."""
    count = 0
    for req in case.reqs:
        if req.fate is Fate.PARTIAL:
            break
        count += 1
        if req.closes or req.fate is Fate.REFUSE:
            break
    return count


def _h11_request(req: Req) -> h11.Request:
    return h11.Request(
        method="HEAD" if req.method == "HEAD" else "GET",
        target="/",
        headers=[("Host", "x")],
    )  # h11 reads the answer to HTTP/1.0 the same way: by its own framing


def converse(port: int, case: Case, wire: bytes, reqs: tuple[Req, ...]) -> Outcome:
    """Send the case's bytes to the gateway and read its answers with h11."""
    out = Outcome(early_close=case.early_close)
    sock = socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        cuts = [0, *case.splits, len(wire)]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for start, end in itertools.pairwise(cuts):
                sock.sendall(wire[start:end])
                if start == 0 and end != len(wire):
                    time.sleep(0.0005)  # the gateway reads the first part on its own
        if case.early_close:
            return out
        want = out.expected = expected_answers(case)
        if want == 0:  # cut short in its first request: an early refusal, or nothing
            sock.settimeout(0.02)
            want = 1
        _read(sock, reqs, want, out)
    return out


def _recv(sock: socket.socket, out: Outcome) -> bytes:
    try:
        data = sock.recv(65536)
    except TimeoutError:
        out.timed_out = True
        return b""
    except ConnectionResetError:
        out.reset = out.closed = True
        return b""
    if not data:
        out.closed = True
    out.raw += data
    return data


def _read(sock: socket.socket, reqs: tuple[Req, ...], want: int, out: Outcome) -> None:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    index = 0
    conn.send(_h11_request(reqs[0]))
    conn.send(h11.EndOfMessage())
    answer: Answer | None = None
    interim: list[int] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if answer is not None:
                out.answers.append(answer)  # incomplete: the case is not clean
            if out.reset or out.timed_out:
                return  # cut off by the reset (or our patience), not malformed
            if answer is not None and reqs[index].answer == "cut" and answer.upstream:
                check_answer(answer, reqs[index], index)
                return  # the engine cut its answer short: the gateway closed, as it must
            raise Broken(
                f"the gateway's bytes are not valid HTTP/1.1 ({exc}): {bytes(out.raw[-800:])!r}"
            ) from None
        if event is h11.NEED_DATA:
            if out.closed or out.timed_out:
                if answer is not None:
                    out.answers.append(answer)  # incomplete: the case is not clean
                    if not out.reset and not out.timed_out:
                        raise Broken(
                            f"the gateway closed inside an answer: {bytes(out.raw[-800:])!r}"
                        )
                return
            data = _recv(sock, out)
            if out.timed_out:
                return
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            req = reqs[index]
            if event.status_code != 100 or not req.expect or req.http10:
                raise Broken(f"a {event.status_code} interim answer to {req.wire[:300]!r}")
            interim.append(event.status_code)
        elif isinstance(event, h11.Response):
            answer = Answer(event.status_code, list(event.headers.raw_items()), interim=interim)
            answer.headers = [(n.lower(), v) for n, v in answer.headers]
            interim = []
        elif isinstance(event, h11.Data):
            assert answer is not None
            answer.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert answer is not None
            answer.complete = True
            out.answers.append(answer)
            check_answer(answer, reqs[index], index)
            answer = None
            if conn.their_state is h11.MUST_CLOSE:
                out.close_after = index
                after_head = index > 0 and reqs[index - 1].method == "HEAD"
                _after_close(sock, conn, out, out.answers[-1], reqs[index], after_head)
                return
            index += 1
            leftover, _ = conn.trailing_data
            if index >= len(reqs):
                if leftover:
                    raise Broken(
                        f"bytes after the answer to every request: {bytes(leftover[:300])!r}"
                    )
                return
            if len(out.answers) >= want and not leftover:
                return  # (what is left, cut short, may be answered early: read if it came)
            conn.start_next_cycle()
            conn.send(_h11_request(reqs[index]))
            conn.send(h11.EndOfMessage())
        elif isinstance(event, h11.ConnectionClosed):
            return
        else:  # pragma: no cover (h11.PAUSED: not reached on the client side)
            return


def _after_close(
    sock: socket.socket,
    conn: h11.Connection,
    out: Outcome,
    answer: Answer,
    req: Req,
    after_head: bool,
) -> None:
    """After an answer that closes the connection: nothing more, then the close."""
    leftover, _ = conn.trailing_data
    deadline = time.monotonic() + 3
    while not out.closed and time.monotonic() < deadline:
        out.timed_out = False
        leftover += _recv(sock, out)
    # A HEAD refused before its URL was read (`HEAD raw:443`), right after another HEAD:
    # llhttp's method is still the last request's, so the gateway cannot tell it from bytes
    # that are no request at all, and sends the refusal's body. The connection closes
    # after it: nothing is out of step.
    refused_head = req.method == "HEAD" and answer.upstream is None and answer.status >= 400
    whole_body = [str(len(leftover)).encode()] == answer.header(b"content-length")
    if leftover and after_head and refused_head and whole_body:
        return
    if leftover:
        raise Broken(f"bytes after an answer that closes the connection: {bytes(leftover[:300])!r}")
    if not out.closed:
        raise Broken("the gateway said Connection: close and kept the connection open")


def check_answer(answer: Answer, req: Req, index: int) -> None:
    """One whole answer, against the request it answers."""
    where = f"answer {index} ({answer.status}) to {req.wire[:200]!r}"
    if answer.status == 500:
        raise Broken(f"a 500: {where}: {answer.body[:300]!r}")
    names = [n for n, _ in answer.headers]
    for name in (b"content-length", b"x-fleet-upstream", b"x-fleet-error", b"content-type"):
        if names.count(name) > 1:
            raise Broken(f"{name.decode()} sent twice: {where}")
    if b"content-length" in names and b"transfer-encoding" in names:
        raise Broken(f"Content-Length and Transfer-Encoding together: {where}")
    for name, value in answer.headers:
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise Broken(f"control bytes in header {name!r}: {where}")
    upstream = answer.upstream
    if upstream is None:
        check_own_answer(answer, req, where)
        return
    if upstream not in UPSTREAMS:
        raise Broken(f"an unknown X-Fleet-Upstream {upstream!r}: {where}")
    if req.fate is not Fate.PASS or req.rid is None:
        raise Broken(f"an engine answered a request that must never reach it: {where}")
    got = answer.header(b"x-fuzz-got")
    if got != [req.rid]:
        raise Broken(f"the engine's answer to another request ({got!r}, not {req.rid!r}): {where}")


def check_own_answer(answer: Answer, req: Req, where: str) -> None:
    """An answer the gateway made itself."""
    if answer.status < 400:
        return
    if answer.status not in GATEWAY_ERRORS:
        raise Broken(f"the gateway answered {answer.status} itself: {where}")
    if req.method == "HEAD":
        return  # a head alone: no envelope to check (nor to tell the readiness report by)
    if answer.status == 503 and _is_health_report(answer.body):
        return  # the readiness report for load balancers (README: /health?ready=1)
    if answer.header(b"x-fleet-error") != [b"gateway"]:
        raise Broken(f"a gateway error without X-Fleet-Error: gateway: {where}")
    ctype = answer.header(b"content-type")
    if ctype != [b"application/json"]:
        raise Broken(f"a gateway error that is not JSON ({ctype!r}): {where}")
    try:
        error = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError):
        raise Broken(
            f"a gateway error that is not the OpenAI envelope: {where}: {answer.body[:300]!r}"
        ) from None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        raise Broken(f"an envelope with other fields: {where}: {answer.body[:300]!r}")
    if not isinstance(error["message"], str) or not error["message"]:
        raise Broken(f"an envelope without a message: {where}")


def _is_health_report(body: bytes) -> bool:
    try:
        report = json.loads(body)
    except ValueError:
        return False
    return isinstance(report, dict) and set(report) == {"status", "deployments"}


def leaks(raw: bytes, sent: bytes) -> list[tuple[bytes, bytes]]:
    """Python's words in what the gateway sent, each with the bytes around it (words the
    client itself sent aside)."""
    return [
        (m.group(), raw[max(0, m.start() - 120) : m.end() + 60])
        for m in LEAKS.finditer(raw)
        if m.group() not in sent
    ]


# ---------------------------------------------------------------- the engine side


def _load(body: bytes) -> Any:
    return json.loads(body.decode(json.detect_encoding(body)))


def same_body(sent: bytes, got: bytes, deployment: str, path: bytes = b"") -> bool:
    """Whether the engine got the body sent: the same bytes, or the same JSON object once
    its `model` is the deployment's served name (and, for a chat or completion stream at
    `path` whose client did not ask for it, `stream_options.include_usage` set: the
    gateway asks for the usage it counts)."""
    if sent == got:
        return True
    try:
        before, after = _load(sent), _load(got)
        if not isinstance(before, dict) or not isinstance(after, dict):
            return False
        before["model"] = SERVED[deployment]
        options = before.get("stream_options")
        if (
            before.get("stream") is True
            and path.endswith((b"/chat/completions", b"/completions"))
            and (
                options is None
                or (isinstance(options, dict) and options.get("include_usage") is not True)
            )
        ):
            before["stream_options"] = {**(options or {}), "include_usage": True}
        return json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True)
    except (ValueError, RecursionError):
        return False


def deployment_of(target: bytes) -> str | None:
    for prefix, dep in ((b"/e/raw/", "raw"), (b"/e/chat2/", "chat"), (b"/e/chat/", "chat")):
        if target.startswith(prefix) or target == prefix[:-1]:
            return dep
    return None


def check_seen(seen: Seen, req: Req | None, index: int, after_close: int | None) -> list[str]:
    """What is wrong with one request the engine received (empty: nothing)."""
    problems = [f"{p} (request {seen.fuzz_id})" for p in seen.problems]
    what = f"{seen.method} {seen.target[:200]!r} id={seen.fuzz_id}"
    if req is None:
        return [*problems, f"the engine received a request nobody sent whole: {what}"]
    if req.fate is not Fate.PASS:
        problems.append(
            f"the engine received a {req.fate.value} request: {what}: {req.wire[:300]!r}"
        )
    if after_close is not None and index > after_close:
        problems.append(f"the engine received a request sent after one that closes: {what}")
    if seen.method != req.method:
        problems.append(f"the engine received method {seen.method}, sent {req.method}: {what}")
    dep = deployment_of(seen.target)
    if dep is None:
        problems.append(f"the engine received a target outside every deployment: {what}")
    elif not same_body(req.body, seen.body, dep, seen.target.split(b"?", 1)[0]):
        problems.append(
            f"the engine received another body ({len(seen.body)} bytes {seen.body[:200]!r}, "
            f"sent {len(req.body)} bytes {req.body[:200]!r}): {what}"
        )
    path = seen.target.split(b"?", 1)[0]
    if b"/./" in path or b"/../" in path or path.endswith((b"/.", b"/..")):
        problems.append(f"dot segments reached the engine: {what}")
    return problems
