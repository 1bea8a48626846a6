"""ToolCallParser: output text -> content and tool calls (server/structured/tools.py's format).

One parser serves whole outputs (`parse_output`), chat streams and Responses streams: it
turns text, as it arrives, into events (content, a call's name, fragments of its arguments).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from server.structured.tools import CALL_CLOSE, CALL_OPEN

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ToolEvent:
    """One piece of parsed output: text (`content`), a call's start (`name`), or a fragment
    of its arguments (`arguments`); `index` numbers the calls of one output from 0."""
    kind: str                 # "content" | "name" | "arguments"
    text: str
    index: int = -1


class ToolCallParser:
    """Splits output text into content and tool calls as it arrives (streaming and not).

    push(text) -> events for what is now certain; finish() -> the rest. Text that may be the
    start of `<tool_call>` is held back; whitespace-only content is held until more text
    comes (a newline between calls is not content). A call's arguments are streamed as raw
    fragments of the JSON value, exactly as generated.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._buf = ""
        self._state = "text"        # text | head | args | tail
        self._ws = ""               # held whitespace-only content
        self._raw = ""              # the current call's text since CALL_OPEN
        self._depth = 0
        self._in_str = self._esc = False

    def push(self, text: str) -> list[ToolEvent]:
        self._buf += text
        out: list[ToolEvent] = []
        while True:
            before = (self._state, len(self._buf))
            getattr(self, "_" + self._state)(out)
            if (self._state, len(self._buf)) == before:
                return out

    def feed(self, text: str, final: bool) -> list[ToolEvent]:
        """A stream's delta -> its events; on the last delta, the rest too (a call cut short
        has already sent its name and arguments so far, so it stays a call)."""
        return self.push(text) + (self.finish(unfinished_as_content=False) if final else [])

    def finish(self, unfinished_as_content: bool = True) -> list[ToolEvent]:
        """The rest. A call cut short (max_tokens) becomes content when unfinished_as_content
        (a whole output); a stream has already sent its name and arguments so far."""
        out: list[ToolEvent] = []
        if self._state == "text":
            self._content(out, self._buf)
        elif unfinished_as_content:
            self._content(out, CALL_OPEN + self._raw + self._buf)
        self._buf = ""
        self._state = "text"
        return out

    def _content(self, out: list[ToolEvent], text: str) -> None:
        if not text:
            return
        if not (self._ws + text).strip():
            self._ws += text
            return
        out.append(ToolEvent("content", self._ws + text))
        self._ws = ""

    def _text(self, out: list[ToolEvent]) -> None:
        i = self._buf.find(CALL_OPEN)
        if i >= 0:
            self._content(out, self._buf[:i])
            self._buf = self._buf[i + len(CALL_OPEN):]
            self._raw = ""
            self._state = "head"
            return
        hold = next((k for k in range(min(len(CALL_OPEN) - 1, len(self._buf)), 0, -1)
                     if CALL_OPEN.startswith(self._buf[-k:])), 0)
        self._content(out, self._buf[:len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold:]

    def _head(self, out: list[ToolEvent]) -> None:
        m = _HEAD.match(self._buf)
        if m is None:
            return
        self._raw += self._buf[:m.end()]
        self._buf = self._buf[m.end():]
        out.append(ToolEvent("name", json.loads(f'"{m.group(1)}"'), self.calls))
        self._depth, self._in_str, self._esc = 0, False, False
        self._state = "args"

    def _args(self, out: list[ToolEvent]) -> None:
        end = None
        for i, ch in enumerate(self._buf):
            if self._esc:
                self._esc = False
            elif self._in_str:
                self._esc, self._in_str = ch == "\\", ch != '"'
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        piece = self._buf if end is None else self._buf[:end]
        if piece:
            out.append(ToolEvent("arguments", piece, self.calls))
        self._raw += piece
        self._buf = self._buf[len(piece):]
        if end is not None:
            self._state = "tail"

    def _tail(self, out: list[ToolEvent]) -> None:
        i = self._buf.find(CALL_CLOSE)
        if i < 0:
            return
        self._buf = self._buf[i + len(CALL_CLOSE):]
        self.calls += 1
        self._state = "text"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str            # the JSON text of the arguments, as generated


def parse_output(text: str) -> tuple[str | None, list[ParsedCall]]:
    """A whole output -> (content, or None when there is none; its tool calls in order)."""
    parser = ToolCallParser()
    events = parser.push(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content").strip()
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for e in events:
        if e.kind == "name":
            names[e.index] = e.text
        elif e.kind == "arguments":
            args.setdefault(e.index, []).append(e.text)
    calls = [ParsedCall(names[i], "".join(args.get(i, []))) for i in sorted(names) if i < parser.calls]
    return content or None, calls
