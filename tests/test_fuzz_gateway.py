"""A short fuzz campaign in the suite (`make fuzz` runs the long one), and the fuzzer's own
parts held to what they promise: the grammar frames what it says it frames, and the
oracle catches what it is there to catch.

The campaign's seed is random unless FUZZ_SEED is set; a failure names it (and hypothesis
the shrunk case), so `make fuzz FUZZ_SEED=<seed> FUZZ_COUNT=<n>` replays it.
"""

from __future__ import annotations

import os
import random

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.campaign import Campaign, GatewayDown
from tests.fuzz.grammar import Fate, Req, request
from tests.fuzz.oracle import Answer, Broken, check_answer, leaks, same_body

SHORT_COUNT = int(os.environ.get("FUZZ_SHORT_COUNT", "1000"))


def test_a_short_fuzz_campaign_breaks_no_invariant() -> None:
    seed = int(os.environ.get("FUZZ_SEED") or random.randrange(1 << 32))
    with Campaign() as campaign:
        try:
            campaign.run(SHORT_COUNT, seed)
        except (Broken, GatewayDown) as exc:
            notes = "\n".join(getattr(exc, "__notes__", []))
            pytest.fail(f"fuzz seed {seed}: {exc}\n{notes}", pytrace=False)
        figures = campaign.figures
    assert figures.findings == [], f"fuzz seed {seed}: {figures.findings}"
    assert figures.cases >= SHORT_COUNT
    assert figures.engine_requests > SHORT_COUNT // 10  # the cases reach the engine too
    assert len(figures.statuses) >= 5, figures.statuses


def _h11_reading(wire: bytes) -> tuple[str, bytes] | None:
    """The request h11 reads from `wire` (method, body), or None where it refuses it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    method, body = "", b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                method = event.method.decode()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return method, body
            else:
                return None
    except h11.RemoteProtocolError:
        return None


@settings(max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_request_the_grammar_passes_is_framed_as_it_says(data: st.DataObject) -> None:
    """What a PASS request says its body is, an independent parser reads as its body."""
    req, junk = data.draw(request(0))
    if req.fate is not Fate.PASS or junk is not None or "length-odd-form" in req.notes:
        return  # refused or cut by design; odd forms h11 reads its own way
    read = _h11_reading(req.wire)
    if read is not None:  # (h11 is stricter than the gateway in places: fine)
        assert read == (req.method, req.body)


def _answer(status: int, headers: dict[bytes, bytes], body: bytes = b"") -> Answer:
    return Answer(status, list(headers.items()), body, complete=True)


GET = Req(rid=b"00000001r0", wire=b"GET /raw/x HTTP/1.1\r\n\r\n", method="GET", fate=Fate.PASS)
ENVELOPE = b'{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}'
OWN = {b"content-type": b"application/json", b"x-fleet-error": b"gateway"}


@pytest.mark.parametrize(
    ("answer", "req", "complaint"),
    [
        (_answer(500, OWN, ENVELOPE), GET, "a 500"),
        (_answer(400, OWN, b'{"detail": "x"}'), GET, "not the OpenAI envelope"),
        (_answer(400, {b"content-type": b"application/json"}, ENVELOPE), GET, "X-Fleet-Error"),
        (_answer(418, OWN, ENVELOPE), GET, "answered 418 itself"),
        (
            _answer(200, {b"x-fleet-upstream": b"raw-0", b"x-fuzz-got": b"00000001r1"}),
            GET,
            "another request",
        ),
        (
            _answer(200, {b"x-fleet-upstream": b"raw-0", b"x-fuzz-got": b"00000001r0"}),
            Req(rid=b"00000001r0", wire=b"", method="GET", fate=Fate.REFUSE),
            "must never reach it",
        ),
    ],
    ids=["500", "no-envelope", "no-marker", "odd-status", "wrong-answer", "refused-forwarded"],
)
def test_the_oracle_refuses_what_breaks_an_invariant(
    answer: Answer, req: Req, complaint: str
) -> None:
    with pytest.raises(Broken, match=complaint):
        check_answer(answer, req, 0)


def test_the_oracle_finds_python_names_but_not_the_gateways_own_words() -> None:
    sent = b"GET /x HTTP/1.1\r\nX-Echo: KeyError\r\n\r\n"
    answer = (
        b"HTTP/1.1 502 Bad Gateway\r\nX-Fleet-Error: gateway\r\n\r\n"
        b'{"error": {"type": "bad_gateway_error", "message": "ValueError: x", "code": "KeyError"}}'
    )
    assert [word for word, _ in leaks(answer, sent)] == [b"ValueError"]
    assert leaks(b"Traceback (most recent call last):", b"")
    assert leaks(b"must be a JSON object, not NoneType", b"")


def test_the_oracle_takes_a_json_body_with_its_model_rewritten_and_nothing_else() -> None:
    sent = b'{"model": "raw", "prompt": "x", "n": 1e400}'
    assert same_body(sent, b'{"model":"org/raw-model","prompt":"x","n":Infinity}', "raw")
    assert not same_body(sent, b'{"model":"org/raw-model","prompt":"y","n":Infinity}', "raw")
    assert not same_body(b"hello", b"hell", "raw")
