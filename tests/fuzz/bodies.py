"""Request bodies for the fuzzer: OpenAI-shaped JSON with odd `model` values, and JSON
(or not) that is hostile to a parser: deep nesting, huge numbers, non-UTF-8, other
encodings, duplicate keys, truncation, plain text and bytes.

`json_body()` draws the body bytes and a label for the figures.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.filler import ints, pick, texts
from tests.fuzz.fleet import MODEL_NAMES

_WORDS = st.sampled_from(["hi", "tok", "qwen", "a b", "ünï", "日本", "\u2028", "x" * 40])
TEXT = texts() | st.lists(_WORDS, max_size=6).map(" ".join)

ODD_MODELS: list[Any] = [
    "",
    " raw",
    "RAW",
    "raw\u0000",
    "org/raw-model/",
    "unknown/model",
    "../raw",
    "raw%20",
    "\ud800",  # a lone surrogate, escaped in the JSON text
    "m" * 3000,
    None,
    7,
    1.5,
    True,
    [],
    ["raw"],
    {"id": "raw"},
]
_KNOWN = st.sampled_from(sorted(MODEL_NAMES))
MODELS = st.one_of(_KNOWN, _KNOWN, _KNOWN, st.sampled_from(ODD_MODELS), TEXT)

# JSON values of any shape (hypothesis' recursive strategy), numbers included.
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=8,
)

# Numbers as JSON text that parsers read differently (beyond float range, beyond 64 bits,
# exponent forms, negative zero), and the non-standard constants.
ODD_NUMBERS = [
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"123456789012345678901234567890",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"0.1e1",
    b"-0",
    b"-0.0",
    b"1E+2",
    b"NaN",
    b"Infinity",
    b"-Infinity",
]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def openai_body(draw: st.DrawFn) -> tuple[bytes, str]:
    """A chat/completions-like request, with any `model`."""
    obj: dict[str, Any] = {}
    if draw(ints(0, 9)) < 9:
        obj["model"] = draw(MODELS)
    kind = pick(draw, ["chat", "completion", "embedding"])
    if kind == "chat":
        obj["messages"] = [{"role": "user", "content": draw(TEXT)}]
    elif kind == "completion":
        obj["prompt"] = draw(TEXT)
    else:
        obj["input"] = draw(st.lists(TEXT, max_size=3))
    if draw(st.booleans()):
        obj["max_tokens"] = draw(ints(-5, 10**6))
    if draw(st.booleans()):
        obj["stream"] = draw(st.booleans())
    if draw(ints(0, 3)) == 3:
        obj[draw(TEXT)] = draw(VALUES)
    return dumps(obj), "openai"


ODD_JSON_KINDS = (
    "deep-array", "deep-object", "number", "duplicate-model", "escapes", "any", "top-level",
    "whitespace",
)  # fmt: skip


@st.composite
def odd_json(draw: st.DrawFn) -> tuple[bytes, str]:
    """Valid or nearly valid JSON that stresses a parser."""
    kind = pick(draw, ODD_JSON_KINDS)
    model = dumps(draw(MODELS))
    if kind == "deep-array":
        depth = pick(draw, [10, 100, 253, 254, 255, 600, 1023, 1024, 3000, 20000])
        return b'{"model":%s,"x":%s%s}' % (model, b"[" * depth, b"]" * depth), kind
    if kind == "deep-object":
        depth = pick(draw, [10, 254, 255, 1024, 5000])
        return b'{"model":%s,"x":%s1%s}' % (model, b'{"a":' * depth, b"}" * depth), kind
    if kind == "number":
        number = pick(draw, ODD_NUMBERS)
        return b'{"model":%s,"max_tokens":%s,"prompt":"x"}' % (model, number), kind
    if kind == "duplicate-model":
        other = dumps(draw(MODELS))
        return b'{"model":%s,"prompt":"x","model":%s}' % (model, other), kind
    if kind == "escapes":
        text = pick(draw, [rb"\u0000", rb"\ud800", rb"\udfff\ud800", rb"\"\\\/", rb"\x"])
        return b'{"model":%s,"prompt":"%s"}' % (model, text), kind
    if kind == "top-level":
        return pick(draw, [b"null", b"[]", b"1", b'"raw"', b"true", b"[{}]"]), kind
    if kind == "whitespace":
        return b' \t\r\n{"model" : %s }\n ' % model, kind
    return dumps(draw(VALUES)), kind


BROKEN_KINDS = (
    "truncated", "utf-16", "utf-8-bom", "latin-1", "stray-byte", "text", "bytes", "empty-object",
    "smuggle-text",
)  # fmt: skip


@st.composite
def broken_body(draw: st.DrawFn) -> tuple[bytes, str]:
    """Not JSON, or not UTF-8: truncated, other encodings, stray bytes, plain text."""
    base, _ = draw(openai_body())
    kind = pick(draw, BROKEN_KINDS)
    if kind == "truncated":
        return base[: len(base) * draw(ints(0, 99)) // 100], kind
    if kind == "utf-16":
        return base.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"), kind
    if kind == "utf-8-bom":
        return b"\xef\xbb\xbf" + base, kind
    if kind == "latin-1":
        return b'{"model":"raw","prompt":"caf\xe9"}', kind
    if kind == "stray-byte":
        at = len(base) * draw(ints(0, 100)) // 100
        byte = pick(draw, [b"\x00", b"\xff", b"\xc3", b"\x80", b"\r\n"])
        return base[:at] + byte + base[at:], kind
    if kind == "text":
        return draw(TEXT).encode("utf-8", "surrogatepass"), kind
    if kind == "bytes":
        return draw(st.binary(max_size=200)), kind
    if kind == "empty-object":
        return b"{}", kind
    # A request line and headers inside a body: data to everyone, never a request.
    return b"GET /raw/v1/models HTTP/1.1\r\nHost: t\r\n\r\n", kind


BODIES = openai_body() | odd_json() | broken_body()
