"""Pure: what the routing policies read of a request, computed once per request and only
for a deployment whose policy needs it (DESIGN.md: routing policies).

- `prompt_blocks`: the prompt's leading text (chat messages in order, role and content;
  a completion's `prompt`; an `input`), cut into blocks of BLOCK bytes, each block's
  hash chained over all before it (a block's hash stands for the whole prefix up to its
  end, as vLLM's prefix cache keys its KV blocks). Only whole blocks count, at most
  MAX_BLOCKS of them: a request's first MAX_BLOCKS x BLOCK bytes say which prefix it
  shares. No tokenizer: BLOCK bytes are about 64 tokens of English, four of vLLM's
  16-token blocks (finer costs more per request: a hash and a table update per block).
- `session_key`: the session header's value (`gateway.session_header`), else the body's
  `user`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

BLOCK = 256  # bytes per block
MAX_BLOCKS = 32  # blocks hashed per request: its first 8 KiB
_LIMIT = BLOCK * MAX_BLOCKS
_SEP = "\x1e"  # between a message's role and content, and between messages

Blocks = tuple[int, ...]


def prompt_blocks(obj: dict[str, Any]) -> Blocks:
    """The chained hashes of the whole blocks that begin the request's prompt; () when it
    has no prompt the gateway can read (or one shorter than a block)."""
    text = _prompt_text(obj)
    if not text:
        return ()
    data = memoryview(text.encode("utf-8", "surrogatepass"))[:_LIMIT]
    hashes: list[int] = []
    running, crc32 = 0, zlib.crc32
    for start in range(0, len(data) - BLOCK + 1, BLOCK):
        running = crc32(data[start : start + BLOCK], running)
        hashes.append(running)
    return tuple(hashes)


def _prompt_text(obj: dict[str, Any]) -> str:
    messages = obj.get("messages")
    if isinstance(messages, list):
        return _messages_text(messages)
    for key in ("prompt", "input"):
        value = obj.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value[:8]):
                return _SEP.join(v for v in value if isinstance(v, str))
            return _messages_text(value)  # the Responses API's input items
    return ""


def _messages_text(messages: list[Any]) -> str:
    parts: list[str] = []
    size = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        parts.append(role if isinstance(role, str) else "")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
            size += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    text = part.get("text")
                    if isinstance(text, str):
                        parts.append(text)
                        size += len(text)
        if size >= _LIMIT:  # the rest is past what is hashed
            break
    return _SEP.join(parts)


def session_key(lines: Sequence[bytes], header: bytes, obj: dict[str, Any] | None) -> str | None:
    """The session a request belongs to: the value of the header named `header` (lower
    case) among the request's forwarded header `lines` (name, ": ", value, CRLF for
    each), else the body's `user`; None when it has neither."""
    for i in range(0, len(lines) - 2, 4):
        if lines[i].lower() == header:
            value = lines[i + 2].strip()
            if value:
                return value.decode("latin-1")
    user = obj.get("user") if obj is not None else None
    return user if isinstance(user, str) and user else None
