"""A JSON request body, as the gateway reads and rewrites it (pure).

Whether a Content-Type is JSON; the body parsed (orjson for the common case, the json
module for what orjson would read differently); `model` set to what the engine serves;
`stream_options.include_usage` asked for on a stream whose client did not (the usage
event is read and dropped, `gateway/usage.py`); the tokens a request may use, reserved
against its key's `tpm` (`gateway/limits.py`).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from vllm_fleet.gateway import form
from vllm_fleet.gateway.errors import Reply, error_reply


def is_json(content_type: str | None) -> bool:
    """Whether a body with this Content-Type header (None: absent) is JSON to the gateway."""
    known = _JSON_TYPES.get(content_type)
    if known is not None:
        return known
    if content_type is None:
        return True  # clients that send JSON without saying so
    mime = mime_type(content_type)
    answer = mime == "application/json" or mime.endswith("+json")
    if len(_JSON_TYPES) < 64 and len(content_type) <= 128:
        _JSON_TYPES[content_type] = answer  # the few a fleet's clients send, remembered
    return answer


_JSON_TYPES: dict[str | None, bool] = {None: True}


def is_multipart(content_type: str) -> bool:
    return mime_type(content_type) == form.MULTIPART


def mime_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


_decode = json.JSONDecoder().decode
# The fallback writes ASCII: a lone surrogate the client escaped (`"\\ud800"`) stays an
# escape rather than failing to encode.
_encode = json.JSONEncoder(separators=(",", ":")).encode
# orjson reads integers beyond 64 bits as floats: a body with a run of 19 digits (even
# inside a string) takes the json module's exact path instead. The run is found by
# mapping digits to "0" and everything else to " " (faster than a regex).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_LONG_RUN = b"0" * 19


class Body:
    """A request body parsed as a JSON object, and which parser read it."""

    __slots__ = ("fast", "obj")

    def __init__(self, obj: dict[str, Any], fast: bool) -> None:
        self.obj = obj
        self.fast = fast  # orjson read it (and writes it back); else the json module

    def get(self, key: str) -> Any:
        return self.obj.get(key)


def parse_object(body: bytes) -> Body | Reply:
    """The body as a JSON object, or the 400 to answer. orjson reads the common case;
    what it refuses or could change (NaN, huge integers, UTF-16, a BOM, bad JSON) goes
    to the json module, whose result and error messages are the reference."""
    if _LONG_RUN not in body.translate(_DIGITS_ONLY):
        try:
            fast = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(fast, dict):
                return Body(fast, True)
    encoding = json.detect_encoding(body)  # UTF-8, or UTF-16/32 and BOMs, as RFC 4627
    try:
        parsed = _decode(body.decode(encoding))
    except UnicodeDecodeError as exc:
        return error_reply(
            400,
            f"the request body is not valid JSON (not {encoding} text: {exc.reason} at "
            f"byte {exc.start}); send a JSON object in UTF-8",
            "invalid_json",
        )
    except (ValueError, RecursionError) as exc:
        return error_reply(
            400,
            f"the request body is not valid JSON ({exc}); send a JSON object",
            "invalid_json",
        )
    if not isinstance(parsed, dict):
        return error_reply(
            400,
            f"the request body must be a JSON object, not {_json_kind(parsed)}",
            "invalid_json",
        )
    return Body(parsed, False)


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (never Python's `NoneType`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


# Engine paths whose streams report usage when asked (stream_options.include_usage).
_STREAM_USAGE_PATHS = ("/chat/completions", "/completions")
# Engine paths that generate: a request reserves its max_tokens (or the default).
_GENERATING_PATHS = (*_STREAM_USAGE_PATHS, "/responses")


def ask_usage(parsed: Body, upstream_path: str) -> tuple[bool, bool]:
    """(a stream, the gateway adds `stream_options.include_usage`): a stream whose
    client did not ask for its usage event gets one, read by the gateway and dropped."""
    obj = parsed.obj
    if obj.get("stream") is not True or not upstream_path.endswith(_STREAM_USAGE_PATHS):
        return False, False
    options = obj.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return True, False
    if options is not None and not isinstance(options, dict):
        return True, False  # the engine's 400 says what is wrong with it
    obj["stream_options"] = {**(options or {}), "include_usage": True}
    return True, True


def estimate(parsed: Body, size: int, upstream_path: str, default: int) -> int:
    """Tokens a request may use, reserved against its key's `tpm`: the completion's
    cap (x `n`) and the prompt, taken as a token per 4 bytes of body (an overestimate
    for JSON, which the real usage corrects)."""
    obj = parsed.obj
    cap = 0
    if upstream_path.endswith(_GENERATING_PATHS):
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = obj.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                cap = value
                break
        else:
            cap = default
        n = obj.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            cap *= min(n, 128)
    return cap + size // 4


def with_model(parsed: Body, body: bytes, served: str, changed: bool = False) -> bytes | Reply:
    """The body with `model` set to `served` (`changed`: another field was set too)."""
    obj = parsed.obj
    if obj.get("model") == served and not changed:
        return body  # already right: forward the client's bytes as they are
    obj["model"] = served
    if parsed.fast:
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:
            pass  # nested deeper than orjson writes (it reads deeper than it writes)
    try:
        return _encode(obj).encode("ascii")
    except RecursionError:
        # orjson reads up to 1024 levels; the json module writes fewer (its depth is
        # Python's recursion limit, less the stack already in use).
        return error_reply(
            400,
            "the request body is nested too deeply for the gateway to rewrite its `model`; "
            "send a JSON object nested less than 900 levels deep",
            "invalid_json",
        )
