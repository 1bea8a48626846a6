"""SSEDecoder: server-sent events (text/event-stream) from lines to event data.

Follows the WHATWG event-stream rules the OpenAI-compatible servers rely on: `data:`
lines of one event are joined with newlines, a blank line ends the event, lines starting
with ':' are comments, `event:`/`id:`/`retry:` fields are read and ignored (only the
data matters here). A final event without its blank line is returned by flush().
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"


class SSEDecoder:
    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line without its terminator; returns an event's data when the event ends."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def decode_lines(lines: list[str]) -> list[str]:
    """Every event's data in a complete stream (for tests and offline parsing)."""
    dec = SSEDecoder()
    out = [d for d in (dec.feed(line) for line in lines) if d is not None]
    tail = dec.flush()
    return out + ([tail] if tail is not None else [])


@dataclass
class ChunkInfo:
    """What one chat.completion.chunk carries that the runner measures."""
    content: str                      # new text of choice 0 ("" when none)
    finish_reason: str | None
    usage: dict[str, Any] | None
    error: str | None                 # an error object sent mid-stream


def parse_chunk(data: str) -> ChunkInfo:
    """One event's data (JSON) -> ChunkInfo; raises ValueError on data that is not JSON."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"stream event is not JSON: {data[:200]!r}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"stream event is not a JSON object: {data[:200]!r}")
    if obj.get("error"):
        err = obj["error"]
        return ChunkInfo("", None, None, err.get("message", str(err)) if isinstance(err, dict) else str(err))
    content = ""
    finish = None
    choices = obj.get("choices") or []
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        content = delta.get("content") or ""
        finish = choices[0].get("finish_reason")
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
    return ChunkInfo(content, finish, usage, None)
