"""The one place that builds the OpenAI error envelope the gateway answers with.

`{"error": {"message", "type", "param", "code"}}`. Errors the gateway makes itself carry
the header `X-Fleet-Error: gateway` so a client can tell them from an engine's own.
Answers are transport-free `Reply` values; each server turns them into its own responses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    417: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",  # OpenAI's type for a request-rate 429 (a token-rate one: "tokens")
    431: "invalid_request_error",
    500: "internal_error",
    501: "invalid_request_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
    505: "invalid_request_error",
}


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer the gateway makes itself: status, extra headers, and the whole body."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def error_object(
    status: int, message: str, code: str, param: str | None = None, kind: str | None = None
) -> dict[str, dict[str, str | None]]:
    """`{"error": {...}}` as a dict, for answers that carry more beside it; `kind`: the
    `type`, when not the status's own."""
    error = {
        "message": message,
        "type": kind or _TYPES.get(status, "api_error"),
        "param": param,
        "code": code,
    }
    return {"error": error}


def envelope(
    status: int, message: str, code: str, param: str | None = None, kind: str | None = None
) -> bytes:
    return json.dumps(error_object(status, message, code, param, kind)).encode()


def error_reply(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
    kind: str | None = None,
) -> Reply:
    extra = [("X-Fleet-Error", "gateway"), *(headers or {}).items()]
    return Reply(status, envelope(status, message, code, param, kind), headers=tuple(extra))


def not_on_demand(dep_id: str) -> Reply:
    """The 409 for loading or unloading by hand a deployment that is always on."""
    return error_reply(
        409,
        f"deployment `{dep_id}` has `start: always`: its engines run all the time; give it "
        "`start: on_demand` to load and unload it",
        "not_on_demand",
    )


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """An error inside an SSE stream that already started, as vLLM sends it."""
    return b"data: " + envelope(status, message, code) + b"\n\ndata: [DONE]\n\n"
