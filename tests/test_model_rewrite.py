"""The request body's `model` rewrite (`core.Core.route`), pure: no server, no engine.

The common body is read and written by orjson; bodies orjson would read differently
(integers beyond 64 bits, NaN, UTF-16, a BOM) go to the json module. Either way the
engine gets the client's JSON with only the top-level `model` changed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from vllm_fleet.config import loads
from vllm_fleet.gateway.core import Core, Forward
from vllm_fleet.gateway.errors import Reply
from vllm_fleet.gpus import Inventory
from vllm_fleet.plan import build_plan
from vllm_fleet.registry import Registry

SERVED = "Qwen/Qwen2.5-1.5B-Instruct"
FLEET = f"""
deployments:
  qwen:
    model: {SERVED}
    aliases: [qwen2.5]
"""


@pytest.fixture(scope="module")
def core() -> Core:
    config = loads(FLEET)
    return Core(config, Registry(config, build_plan(config, Inventory(None, "none"), "python")))


def forwarded(core: Core, body: bytes, path: str = "/qwen/v1/chat/completions") -> bytes:
    decided = core.route("POST", path, "", "application/json", body)
    assert isinstance(decided, Forward), decided
    return decided.body


def rejected(core: Core, body: bytes, path: str = "/qwen/v1/chat/completions") -> Reply:
    decided = core.route("POST", path, "", "application/json", body)
    assert isinstance(decided, Reply), decided
    return decided


@pytest.mark.parametrize("path", ["/qwen/v1/chat/completions", "/v1/chat/completions"])
def test_only_the_top_level_model_changes(core: Core, path: str) -> None:
    client: dict[str, Any] = {
        "model": "qwen2.5",
        "messages": [{"role": "user", "content": 'say "model": "x" — ünïcödé 🙂'}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"model": 1}}}],
        "temperature": 0.1,
        "seed": 2**53 + 1,  # not a float's integer: kept exact
        "max_tokens": 7,
        "logit_bias": {"50256": -100},
        "stop": None,
    }
    body = forwarded(core, json.dumps(client, ensure_ascii=False).encode(), path)
    assert json.loads(body) == {**client, "model": SERVED}
    assert list(json.loads(body)) == list(client)  # key order kept
    assert "ünïcödé 🙂".encode() in body  # UTF-8 as sent, not \\u-escaped


def test_a_body_already_naming_the_served_model_is_forwarded_byte_for_byte(core: Core) -> None:
    body = b'{ "model" : "%s",\n  "prompt": "x",  "n": 1.50 }' % SERVED.encode()
    assert forwarded(core, body, "/qwen/v1/completions") is body


@pytest.mark.parametrize(
    "number",
    [
        "18446744073709551616",  # 2**64: orjson would read a float
        "-9223372036854775809",  # below the smallest 64-bit integer
        "123456789012345678901234567890",
    ],
)
def test_integers_beyond_64_bits_reach_the_engine_exactly(core: Core, number: str) -> None:
    body = forwarded(core, b'{"model": "x", "seed": %s}' % number.encode())
    assert json.loads(body) == {"model": SERVED, "seed": int(number)}
    assert number.encode() in body


@pytest.mark.parametrize("depth", [300, 900])
def test_deeply_nested_bodies_are_rewritten_not_failed(core: Core, depth: int) -> None:
    # orjson reads up to 1024 levels but writes only about 254: the json module writes
    # what orjson cannot.
    nested = b"[" * depth + b"]" * depth
    body = forwarded(core, b'{"model": "x", "deep": %s}' % nested)
    assert json.loads(body)["model"] == SERVED
    assert body.endswith(b'"deep":' + nested + b"}")


def test_nan_and_infinity_are_kept_as_the_client_wrote_them(core: Core) -> None:
    body = forwarded(core, b'{"model": "x", "a": NaN, "b": -Infinity, "c": 1e400}')
    parsed = json.loads(body)
    assert parsed["model"] == SERVED
    assert math.isnan(parsed["a"])
    assert parsed["b"] == parsed["c"] * -1 == -math.inf


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_bodies_in_other_json_encodings_are_sent_on_as_utf8(core: Core, encoding: str) -> None:
    body = forwarded(core, json.dumps({"model": "x", "prompt": "é"}).encode(encoding))
    assert json.loads(body.decode("utf-8")) == {"model": SERVED, "prompt": "é"}


def test_a_lone_surrogate_the_client_escaped_stays_an_escape(core: Core) -> None:
    body = forwarded(core, b'{"model": "x", "prompt": "\\ud800 \\ud83d\\ude42 \xc3\xa9"}')
    assert json.loads(body) == {"model": SERVED, "prompt": "\ud800 \U0001f642 \u00e9"}
    assert b"\\ud800" in body


def test_duplicate_model_keys_count_once_the_last_as_in_json(core: Core) -> None:
    body = forwarded(core, b'{"model": "nope", "prompt": "x", "model": "qwen"}', "/v1/completions")
    assert body.count(b'"model"') == 1
    assert json.loads(body) == {"model": SERVED, "prompt": "x"}
    # Routing reads the same (last) key: `nope` is no deployment.
    assert rejected(core, b'{"model": "qwen", "model": "nope"}', "/v1/completions").status == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "x",}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
        (b'{"model": "\xed\xa0\x80"}', "not valid JSON"),  # a UTF-8-encoded surrogate
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b"12345678901234567890", "must be a JSON object, not a number"),
    ],
)
def test_bodies_that_are_not_a_json_object_get_a_400(core: Core, body: bytes, says: str) -> None:
    reply = rejected(core, body)
    assert reply.status == 400
    assert says in json.loads(reply.body)["error"]["message"]


# ---------------------------------------------------------------- multipart forms (uploads)


def form(*parts: tuple[str, bytes, str | None], boundary: bytes = b"b0und") -> bytes:
    """A multipart/form-data body: (name, value, filename or None) per part."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += b"--%s\r\nContent-Disposition: %s\r\n\r\n%s\r\n" % (
            boundary,
            disposition.encode(),
            value,
        )
    return out + b"--%s--\r\n" % boundary


FORM = "multipart/form-data; boundary=b0und"
AUDIO = bytes(range(256)) * 4 + b"\r\n--b0un\r\n--b0undX"  # near-boundaries inside


def route_form(core: Core, body: bytes, path: str, content_type: str = FORM) -> Forward | Reply:
    return core.route("POST", path, "", content_type, body)


@pytest.mark.parametrize("path", ["/qwen/v1/audio/transcriptions", "/v1/audio/transcriptions"])
def test_the_form_model_field_is_set_and_every_other_byte_kept(core: Core, path: str) -> None:
    body = form(("file", AUDIO, "a.wav"), ("model", b"qwen2.5", None), ("language", b"en", None))
    decided = route_form(core, body, path)
    assert isinstance(decided, Forward) and decided.deployment == "qwen"
    assert decided.body == body.replace(b"qwen2.5", SERVED.encode())


def test_a_model_value_with_boundary_like_text_is_replaced_whole(core: Core) -> None:
    body = form(("model", b"qw\r\n--b0unen", None), ("file", AUDIO, "a.wav"))
    decided = route_form(core, body, "/qwen/v1/audio/transcriptions")
    assert isinstance(decided, Forward)
    assert decided.body == body.replace(b"qw\r\n--b0unen", SERVED.encode())


def test_a_file_part_named_model_is_not_the_model_field(core: Core) -> None:
    body = form(("model", b"not a name", "model.bin"), ("file", AUDIO, "a.wav"))
    decided = route_form(core, body, "/qwen/v1/audio/transcriptions")
    assert isinstance(decided, Forward) and decided.body == body  # no field: untouched


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (form(("model", b"a", None), ("model", b"b", None)), FORM, "more than one `model`"),
        (form(("model", b"qwen", None)), "multipart/form-data", "no boundary"),
        (b"--b0und\r\nno headers end", FORM, "malformed"),
        (form(("model", b"\xff\xfe", None)), FORM, "not UTF-8"),
        (form(("model", b"", None)), FORM, "could not be rewritten"),
    ],
)
def test_forms_the_gateway_cannot_read_get_a_400(
    core: Core, body: bytes, content_type: str, says: str
) -> None:
    decided = route_form(core, body, "/qwen/v1/audio/transcriptions", content_type)
    assert isinstance(decided, Reply) and decided.status == 400, decided
    assert says in json.loads(decided.body)["error"]["message"]
