"""Chat tools at the API: the request's tool constraint, its prompt, and the calls in its answer.

- `tool_spec`: tools + tool_choice (+ parallel_tool_calls) -> the ConstraintSpec of kind
  "tools" (server/structured/tools.py), or None when no call may be made. `required` and a
  named choice are enforced by the grammar from the first token; `auto` lets the model write
  text and enforces a call from its `<tool_call>` on.
- `template_inputs`: messages (assistant `tool_calls`, `tool` results) and tools for the chat
  template. A template that takes `tools` gets them as transformers documents (arguments as
  objects); any other gets the fallback below, in the output format the grammar enforces.
- `ToolOutput`: one choice's output -> content, tool_calls and finish_reason, whole or as
  stream deltas (`index`, `id`, `name`, then `arguments` fragments, as OpenAI streams them).
"""
from __future__ import annotations

import json
import uuid

from server.api import errors
from server.api.protocol import ChatCompletionRequest, ChatDelta, ChatMessage
from server.api.tool_models import FunctionCall, FunctionDelta, NamedToolChoice, ToolCall, ToolCallDelta, ToolDef
from server.structured.spec import ConstraintSpec
from server.structured.tool_parser import ToolCallParser, ToolEvent, parse_output
from server.structured.tools import CALL_CLOSE, CALL_OPEN, ToolSpec

# The fallback tool prompt, for chat templates that do not take `tools` (SmolLM2's, for one).
FALLBACK_PROMPT = """# Tools

You may call one or more of the functions below to help with the user's request. Their
signatures are JSON Schemas, one per line, inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments inside
<tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": <function name>, "arguments": <the arguments as a JSON object>}}
</tool_call>"""


def active_tools(body: ChatCompletionRequest) -> tuple[list[ToolDef], str | NamedToolChoice]:
    """(the tools, the effective tool_choice), checked: 400s for a choice without tools, a
    name that is not among them, duplicate names, or tools beside another constraint."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise errors.invalid("tools: each function name must be unique", "tools")
    if choice != "none" and not tools:
        raise errors.invalid("tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise errors.invalid(f"tool_choice names the function {choice.function.name!r}, which is not "
                             "among the tools", "tool_choice")
    if choice != "none" and (body.structured_outputs is not None or
                             (body.response_format or {}).get("type", "text") != "text"):
        raise errors.invalid("tools cannot be combined with response_format or structured_outputs; "
                             "use tool_choice \"none\" for a constrained text answer", "tool_choice")
    return tools, choice


def tool_spec(body: ChatCompletionRequest) -> ConstraintSpec | None:
    """The request's tool constraint, or None when it may call no function."""
    tools, choice = active_tools(body)
    if choice == "none":
        return None
    parallel = body.parallel_tool_calls is not False
    defs = tuple((t.function.name, t.function.parameters) for t in tools)
    if isinstance(choice, NamedToolChoice):
        spec = ToolSpec("required", False, tuple(d for d in defs if d[0] == choice.function.name))
    else:
        spec = ToolSpec(choice, parallel, defs)
    return ConstraintSpec("tools", spec.source(), name="tools")


def template_inputs(body: ChatCompletionRequest, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template; native: the template takes `tools` itself."""
    tools, choice = active_tools(body)
    shown = [t.model_dump(exclude_none=True) for t in tools] if choice != "none" else []
    if native:
        return [_native(m) for m in body.messages], shown or None
    messages: list[dict] = []
    for k, m in enumerate(body.messages):
        if m.role == "tool":      # results become one user turn, however many calls they answer
            result = f"<tool_response>\n{m.text()}\n</tool_response>"
            if k and body.messages[k - 1].role == "tool":
                messages[-1]["content"] += "\n" + result
            else:
                messages.append({"role": "user", "content": result})
            continue
        text = m.text()
        if m.tool_calls:
            calls = [f"{CALL_OPEN}\n{_call_json(c)}\n{CALL_CLOSE}" for c in m.tool_calls]
            text = "\n".join(([text] if text else []) + calls)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if shown:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in shown))
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = (messages[0]["content"] + "\n\n" + prompt).strip()
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _call_json(call: ToolCall) -> str:
    return json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)},
                      separators=(",", ":"), ensure_ascii=False)


def _arguments(text: str):
    """A call's arguments as an object for templates (the text itself when it does not parse)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native(m: ChatMessage) -> dict:
    out: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str | None, calls: int) -> str | None:
    """An output that ended by itself after making calls finishes with "tool_calls"."""
    return "tool_calls" if calls and reason == "stop" else reason


def whole_output(text: str, reason: str | None) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """One choice's whole output -> (content, tool_calls or None, finish_reason). Without a
    complete call the text is the content, exactly as generated."""
    content, parsed = parse_output(text)
    if not parsed:
        return text, None, reason
    calls = [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed]
    return content, calls, finish_reason(reason, len(calls))


class StreamedCalls:
    """One streamed choice: engine text deltas -> ChatDelta pieces."""

    def __init__(self) -> None:
        self.parser = ToolCallParser()
        self._ids: dict[int, str] = {}

    def deltas(self, text: str, final: bool) -> list[ChatDelta]:
        return [self._delta(e) for e in self.parser.feed(text, final)]

    def finish_reason(self, reason: str | None) -> str | None:
        return finish_reason(reason, len(self._ids))

    def _delta(self, e: ToolEvent) -> ChatDelta:
        if e.kind == "content":
            return ChatDelta(content=e.text)
        if e.kind == "name":
            self._ids[e.index] = new_call_id()
            return ChatDelta(tool_calls=[ToolCallDelta(index=e.index, id=self._ids[e.index], type="function",
                                                       function=FunctionDelta(name=e.text, arguments=""))])
        return ChatDelta(tool_calls=[ToolCallDelta(index=e.index, function=FunctionDelta(arguments=e.text))])
