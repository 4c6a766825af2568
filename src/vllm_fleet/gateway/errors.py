"""The one place that builds the OpenAI error envelope the gateway answers with.

`{"error": {"message", "type", "param", "code"}}`. Errors the gateway makes itself carry
the header `X-Fleet-Error: gateway` so a client can tell them from an engine's own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def envelope(status: int, message: str, code: str, param: str | None = None) -> bytes:
    error = {
        "message": message,
        "type": _TYPES.get(status, "api_error"),
        "param": param,
        "code": code,
    }
    return json.dumps({"error": error}).encode()


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    response = web.Response(
        status=status,
        body=envelope(status, message, code, param),
        content_type="application/json",
    )
    response.headers["X-Fleet-Error"] = "gateway"
    if headers:
        response.headers.update(headers)
    return response


def sse_error_event(message: str, code: str, status: int = 502) -> bytes:
    """An error inside an SSE stream that already started, as vLLM sends it."""
    return b"data: " + envelope(status, message, code) + b"\n\ndata: [DONE]\n\n"
