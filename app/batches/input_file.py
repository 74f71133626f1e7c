"""A batch input file (JSONL, one request per line) -> validated lines, or an error naming the line.

Checked for every line: a JSON object with a non-empty string `custom_id` that no earlier line used,
`method` POST, `url` the batch endpoint, and a `body` that decodes as a chat completion request (its
shape only; what the body asks for — an image, a model — is judged when the line runs, and a bad one
becomes an error line of the output, not a rejected file). Blank lines are skipped; line numbers count
every line of the file from 1, as an editor shows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from app.batches.schemas import CHAT_ENDPOINT, InputLine
from app.chat.schemas import ChatCompletionRequest


class InputFileError(ValueError):
    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True, slots=True)
class BatchLine:
    line_no: int
    custom_id: str
    body: bytes  # the request body as sent (JSON)


_line_decoder = msgspec.json.Decoder(InputLine)
_body_decoder = msgspec.json.Decoder(ChatCompletionRequest)


def decode_body(body: bytes) -> ChatCompletionRequest:
    return _body_decoder.decode(body)


def parse_input_file(content: bytes, max_requests: int, endpoint: str = CHAT_ENDPOINT) -> list[BatchLine]:
    lines: list[BatchLine] = []
    first_seen: dict[str, int] = {}
    for line_no, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = _line_decoder.decode(raw)
        except msgspec.DecodeError as e:
            raise InputFileError(f"not a valid request line: {e}", line_no) from None
        if not entry.custom_id:
            raise InputFileError("custom_id must not be empty", line_no)
        if entry.custom_id in first_seen:
            raise InputFileError(f"custom_id {entry.custom_id!r} is already used on line "
                                 f"{first_seen[entry.custom_id]}; each request needs its own", line_no)
        if entry.method.upper() != "POST":
            raise InputFileError(f"method must be POST, got {entry.method!r}", line_no)
        if entry.url != endpoint:
            raise InputFileError(f"url must be {endpoint!r}, got {entry.url!r}", line_no)
        try:
            body = decode_body(entry.body)
        except msgspec.DecodeError as e:
            raise InputFileError(f"body is not a chat completion request: {e}", line_no) from None
        if body.stream:
            raise InputFileError("body.stream must be false: a batch answers each request whole", line_no)
        if len(lines) == max_requests:
            raise InputFileError(f"the file holds more than {max_requests} requests, the limit per batch "
                                 f"(setting max_batch_requests)", line_no)
        first_seen[entry.custom_id] = line_no
        lines.append(BatchLine(line_no, entry.custom_id, bytes(entry.body)))
    if not lines:
        raise InputFileError("the file holds no requests")
    return lines
