"""A streamed chat request as a client sees it, on a raw socket, parsed strictly.

Each request gets its own connection (`Connection: close`); the answer is read to the
end, de-chunked with h11 (an HTTP/1.1 implementation independent of the gateway's
llhttp), and its SSE events are sorted into tokens, error events and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import h11


@dataclass
class StreamOutcome:
    status: int = 0
    engine: str = ""  # the fake engine's X-Fake-Engine header: which replica answered
    tokens: int = 0
    error_events: int = 0
    done: bool = False  # `data: [DONE]` arrived
    complete: bool = False  # the HTTP message ended as framed (last chunk, or full length)
    failure: str = ""  # the connection broke or the answer was not HTTP

    @property
    def intact(self) -> bool:
        """Every token, no error, [DONE], a whole HTTP message."""
        return (
            self.status == 200
            and self.complete
            and self.done
            and not self.error_events
            and not self.failure
        )

    @property
    def ended_with_error_event(self) -> bool:
        """A broken stream, ended as the gateway promises: an error event, then [DONE]."""
        return self.status == 200 and self.error_events > 0 and self.done and self.complete


def chat_request(path: str, tokens: int, stream: bool = True) -> bytes:
    body = json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
         "stream": stream}
    ).encode()  # fmt: skip
    head = (
        f"POST {path} HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _events(body: bytes, outcome: StreamOutcome) -> None:
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                outcome.done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                outcome.failure = f"an event that is not JSON: {data[:80]!r}"
                continue
            if "error" in event:
                outcome.error_events += 1
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    outcome.tokens += 1


async def stream(port: int, path: str, tokens: int, timeout: float = 120.0) -> StreamOutcome:
    """POST a streamed chat request to 127.0.0.1:port and read the answer to its end."""
    outcome = StreamOutcome()
    conn = h11.Connection(h11.CLIENT)
    body = bytearray()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        outcome.failure = f"connect: {exc}"
        return outcome
    try:
        writer.write(chat_request(path, tokens))
        async with asyncio.timeout(timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)  # b"" is the close
                    continue
                if isinstance(event, h11.Response):
                    outcome.status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    outcome.engine = headers.get("x-fake-engine", "")
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    outcome.complete = True
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    break
    except h11.RemoteProtocolError as exc:
        outcome.failure = f"not valid HTTP/1.1, or cut off: {exc}"
    except (OSError, TimeoutError) as exc:
        outcome.failure = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
    _events(bytes(body), outcome)
    return outcome
