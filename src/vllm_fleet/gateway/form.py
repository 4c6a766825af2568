"""The `model` field of a multipart/form-data body: audio uploads
(`/v1/audio/transcriptions`, `/v1/audio/translations`) name their model there.

The body is read with python-multipart (Starlette's parser, the one vLLM's server uses)
to find the field, and only the field's value is replaced: every other byte of the
upload reaches the engine as the client sent it.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vllm_fleet.gateway.errors import Reply, error_reply

MULTIPART = "multipart/form-data"


@dataclass(slots=True)
class FormModel:
    """The body's `model` field: its value, and where that value lies in the body."""

    value: str | None = None  # None: no `model` field
    start: int = 0
    end: int = 0


def _bad(message: str) -> Reply:
    return error_reply(400, message, "invalid_request")


class _Reader:
    """python-multipart callbacks: the `model` fields and where their values lie."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.found: list[tuple[bytes, list[tuple[int, int]], bool]] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data: list[bytes] = []
        self._spans: list[tuple[int, int]] = []
        self._in_body = True  # every piece of the part came from the body itself

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self._disposition = b""
        self._data = []
        self._spans = []
        self._in_body = True

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])
        if data is self.body:
            self._spans.append((start, end))
        else:  # from the parser's own look-behind buffer: no place in the body
            self._in_body = False

    def part_end(self) -> None:
        _, params = parse_options_header(self._disposition)
        if params.get(b"name") == b"model" and b"filename" not in params:
            spans = self._spans if self._in_body else []
            self.found.append((b"".join(self._data), spans, self._in_body))


def find_model(body: bytes, content_type: str) -> FormModel | Reply:
    """The `model` field of a multipart/form-data body, or the 400 to answer."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        return _bad(f"the {MULTIPART} body has no boundary in its Content-Type")
    reader = _Reader(body)
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        return _bad(f"the {MULTIPART} body is malformed ({exc})")
    if not reader.found:
        return FormModel()
    if len(reader.found) > 1:
        return _bad("the form has more than one `model` field; send it once")
    value, spans, in_body = reader.found[0]
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return _bad("the form's `model` field is not UTF-8 text")
    if not spans or not in_body:
        return _unplaced(text)  # empty, or read from the parser's look-behind buffer
    start, end = spans[0][0], spans[-1][1]
    if body[start:end] != value:
        return _unplaced(text)
    return FormModel(text, start, end)


def _unplaced(text: str) -> Reply:
    return _bad(
        f"the form's `model` field ({text[:80]!r}) could not be rewritten in place; "
        "send the deployment id as the model, or leave the field out"
    )


def with_model(body: bytes, found: FormModel, served: str) -> bytes:
    """`body` with the `model` field's value set to `served` (as is when already so, or
    when the form has no `model` field)."""
    if found.value is None or found.value == served:
        return body
    return body[: found.start] + served.encode() + body[found.end :]
