"""The tokens an answer used, read from the engine's `usage` without parsing every chunk.

Pure. A non-streamed answer carries `usage` in its JSON body. A stream carries it in one
event near its end (`stream_options.include_usage`, which the gateway asks for when the
client did not): `Meter` keeps each read's last incomplete event back until it is
whole, finds the usage event with a byte search (no JSON work on other chunks), parses
only that one, and leaves it out of what the client gets when the client had not asked
for it. Counts both OpenAI's names (`prompt_tokens`/`completion_tokens`) and the
Responses API's (`input_tokens`/`output_tokens`).
"""

from __future__ import annotations

from typing import Any

import orjson

USAGE_MARK = b'"usage":'
MAX_HELD = 1 << 16  # bytes of an unfinished event held back before it is passed on as is
MAX_BODY = 8 << 20  # bytes of a non-streamed body kept to read its usage


def tokens_of(obj: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a decoded answer's `usage`, or None."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return max(0, prompt), max(0, completion)


def body_tokens(body: bytes) -> tuple[int, int] | None:
    if USAGE_MARK not in body and b'"usage"' not in body:
        return None
    try:
        return tokens_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def _event_end(buf: bytes) -> int:
    """The end of the last whole SSE event in `buf` (0: none)."""
    lf = buf.rfind(b"\n\n")
    crlf = buf.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class Meter:
    """What one answer used, watched as its body passes (`feed`, then `end`)."""

    __slots__ = ("_body", "_size", "drop_usage", "held", "sse", "usage")

    def __init__(self, drop_usage: bool) -> None:
        self.drop_usage = drop_usage  # the client did not ask for the usage event
        self.sse = False
        self.usage: tuple[int, int] | None = None
        self.held = b""  # an unfinished event, passed on once it is whole
        self._body: list[bytes] | None = None
        self._size = 0  # bytes in _body

    def start(self, sse: bool, json_body: bool) -> None:
        """The answer's head: a stream, a JSON body (kept to read), or neither."""
        self.sse = sse
        self._body = [] if json_body and not sse else None

    def feed(self, data: bytes) -> bytes:
        """The bytes of `data` to pass on now. (The relay skips the call for a stream's
        common read: a whole event, no usage in it, nothing held back before it.)"""
        if not self.sse:
            body = self._body
            if body is not None:
                body.append(data)
                self._size += len(data)
                if self._size > MAX_BODY:
                    self._body = None  # too big to keep: no usage read from it
            return data
        if self.held:
            data = self.held + data
            self.held = b""
        if not data.endswith(b"\n\n"):  # (the common read ends with its last event)
            end = _event_end(data)
            if end < len(data) and len(data) - end <= MAX_HELD:
                self.held = data[end:]
                data = data[:end]
        if USAGE_MARK in data:
            data = self._take_usage(data)
        return data

    def end(self) -> bytes:
        """The answer is complete: what was still held back, to pass on last."""
        if self.sse:
            rest, self.held = self.held, b""
            return self._take_usage(rest) if USAGE_MARK in rest else rest
        if self._body:
            self.usage = body_tokens(b"".join(self._body))
        self._body = None
        return b""

    def _take_usage(self, data: bytes) -> bytes:
        """Read the usage event in these whole events; without it, if the client did not
        ask for it."""
        events = data.split(b"\n\n") if b"\r\n\r\n" not in data else data.split(b"\r\n\r\n")
        sep = b"\n\n" if b"\r\n\r\n" not in data else b"\r\n\r\n"
        kept = []
        for event in events:
            if USAGE_MARK in event:
                obj = _event_data(event)
                found = tokens_of(obj)
                if found is not None:
                    self.usage = found
                    if self.drop_usage and obj.get("choices") == []:
                        continue  # the usage event alone: the client did not ask for it
            kept.append(event)
        return sep.join(kept)


def _event_data(event: bytes) -> Any:
    """The JSON of an SSE event's `data:` line (None if it has none, or bad JSON)."""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                return orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
    return None
