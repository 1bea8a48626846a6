"""POST /v1/responses: the Responses API, stateless, generated as the equivalent chat completion.

The request is checked and translated (api/responses_protocol.py), then prepared by the chat
path (auth, adapter, template, tools, constraints, metrics, errors). The output is one
assistant message (`output_text`) and/or `function_call` items. A stream sends OpenAI's event
sequence: response.created, response.in_progress, then per output item
output_item.added, (content_part.added, output_text.delta..., output_text.done,
content_part.done | function_call_arguments.delta..., function_call_arguments.done),
output_item.done, and at the end response.completed (or response.incomplete at the token
budget). Each event is an SSE `event:` line plus its JSON `data:`, numbered by sequence_number.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api import errors
from server.api.generation import Generation
from server.api.openai_routes import chat_chars, encode_chat, prepare, stream_response, until_disconnect
from server.api.responses_protocol import ResponsesRequest
from server.api.tool_calls import active_tools, new_call_id, whole_output
from server.structured.tool_parser import ToolCallParser, ToolEvent

router = APIRouter()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One response's output items, built from text deltas (streamed or whole) -> events."""

    def __init__(self, body: ResponsesRequest, gen: Generation, tools_on: bool) -> None:
        self.body, self.gen, self.tools_on = body, gen, tools_on
        self.id = _id("resp")
        self.created = int(time.time())
        self.items: list[dict] = []
        self.seq = 0
        self._parser = ToolCallParser() if tools_on else None
        self._message: dict | None = None       # the open message item
        self._call: dict | None = None          # the open function_call item

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def response(self, status: str, reason: str | None = None) -> dict:
        b = self.body
        usage = None
        if status != "in_progress":
            usage = {"input_tokens": self.gen.prompt_tokens, "output_tokens": self.gen.completion_tokens,
                     "total_tokens": self.gen.prompt_tokens + self.gen.completion_tokens,
                     "input_tokens_details": {"cached_tokens": self.gen.cached_tokens},
                     "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": {"reason": reason} if reason else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.gen.label,
                "output": self.items if status != "in_progress" else [],
                "parallel_tool_calls": b.parallel_tool_calls is not False,
                "temperature": b.temperature, "top_p": b.top_p,
                "tool_choice": b.tool_choice.model_dump() if hasattr(b.tool_choice, "model_dump")
                else (b.tool_choice or "auto"),
                "tools": [t.model_dump(exclude_none=True) for t in b.tools or []],
                "text": b.text.model_dump(by_alias=True, exclude_none=True) if b.text else {"format": {"type": "text"}},
                "store": False, "metadata": b.metadata or {}, "usage": usage, "user": b.user}

    def start(self) -> list[str]:
        return [self.event("response.created", response=self.response("in_progress")),
                self.event("response.in_progress", response=self.response("in_progress"))]

    def push(self, text: str, final: bool) -> list[str]:
        """Events for one text delta of the output (final: the last one)."""
        if self._parser is None:
            events = [ToolEvent("content", text)] if text else []
        else:
            events = self._parser.feed(text, final)
        out: list[str] = []
        for e in events:
            out += self._content(e.text) if e.kind == "content" else self._tool(e)
        if final:
            out += self._close_message() + self._close_call()
        return out

    def finish(self, reason: str | None) -> list[str]:
        incomplete = "max_output_tokens" if reason == "length" else None
        kind = "response.incomplete" if incomplete else "response.completed"
        return [self.event(kind, response=self.response("incomplete" if incomplete else "completed", incomplete))]

    def _content(self, text: str) -> list[str]:
        out = self._close_call()
        if self._message is None:
            self._message = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant",
                             "content": []}
            self.items.append(self._message)
            out.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                  item={**self._message, "content": []}))
            self._message["content"].append({"type": "output_text", "text": "", "annotations": []})
            out.append(self.event("response.content_part.added", item_id=self._message["id"],
                                  output_index=len(self.items) - 1, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
        self._message["content"][0]["text"] += text
        out.append(self.event("response.output_text.delta", item_id=self._message["id"],
                              output_index=self.items.index(self._message), content_index=0, delta=text))
        return out

    def _close_message(self) -> list[str]:
        m, self._message = self._message, None
        if m is None:
            return []
        m["status"] = "completed"
        i, part = self.items.index(m), m["content"][0]
        return [self.event("response.output_text.done", item_id=m["id"], output_index=i, content_index=0,
                           text=part["text"]),
                self.event("response.content_part.done", item_id=m["id"], output_index=i, content_index=0, part=part),
                self.event("response.output_item.done", output_index=i, item=m)]

    def _tool(self, e: ToolEvent) -> list[str]:
        if e.kind == "name":
            out = self._close_message() + self._close_call()
            self._call = {"type": "function_call", "id": _id("fc"), "call_id": new_call_id(), "name": e.text,
                          "arguments": "", "status": "in_progress"}
            self.items.append(self._call)
            return out + [self.event("response.output_item.added", output_index=len(self.items) - 1,
                                     item=dict(self._call))]
        self._call["arguments"] += e.text
        return [self.event("response.function_call_arguments.delta", item_id=self._call["id"],
                           output_index=self.items.index(self._call), delta=e.text)]

    def _close_call(self) -> list[str]:
        c, self._call = self._call, None
        if c is None:
            return []
        c["status"] = "completed"
        i = self.items.index(c)
        return [self.event("response.function_call_arguments.done", item_id=c["id"], output_index=i,
                           arguments=c["arguments"]),
                self.event("response.output_item.done", output_index=i, item=c)]

    def whole(self, text: str) -> None:
        """The output items of a whole (not streamed) output."""
        content, calls, _ = whole_output(text, None) if self.tools_on else (text, None, None)
        if content:
            self.items.append({"type": "message", "id": _id("msg"), "status": "completed", "role": "assistant",
                               "content": [{"type": "output_text", "text": content, "annotations": []}]})
        for c in calls or []:
            self.items.append({"type": "function_call", "id": _id("fc"), "call_id": c.id, "name": c.function.name,
                               "arguments": c.function.arguments, "status": "completed"})


async def _events(gen: Generation, builder: ResponseBuilder) -> AsyncIterator[str]:
    for line in builder.start():
        yield line
    reason = None
    try:
        async with contextlib.aclosing(gen.stream()) as deltas:
            async for d in deltas:
                for line in builder.push(d.text, d.finish_reason is not None):
                    yield line
                reason = d.finish_reason or reason
    except Exception as e:  # the stream has started: report in-band, then end it
        err = errors.from_exception(e) or errors.internal_error(e, gen.request_id)
        yield builder.event("error", code=err.code, message=err.message, param=err.param)
        return
    for line in builder.finish(reason):
        yield line


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    refused = body.refused_fields()
    if refused:
        raise errors.invalid(f"{refused[0]} is not supported: this server keeps no state between requests",
                             refused[0], "unsupported_parameter")
    if body.max_output_tokens is not None and body.max_output_tokens < 1:
        raise errors.invalid(f"max_output_tokens must be >= 1, got {body.max_output_tokens}", "max_output_tokens")
    try:
        chat = body.to_chat()
    except ValueError as e:
        raise errors.invalid(f"input cannot be read as a conversation: {e}", "input") from e
    state, gen = await prepare(request, chat, lambda tok: [encode_chat(tok, chat)], chat_chars(chat), "input")
    builder = ResponseBuilder(body, gen, active_tools(chat)[1] != "none")
    if body.stream:
        return stream_response(_events(gen, builder))
    out = await until_disconnect(request, asyncio.create_task(gen.collect()))
    d = out[0]
    builder.whole(d.text)
    status, reason = ("incomplete", "max_output_tokens") if d.finish_reason == "length" else ("completed", None)
    return JSONResponse(builder.response(status, reason))
