"""server/api/tool_calls.py: tool requests checked, conversations rendered, calls read back."""
from __future__ import annotations

import json

import pytest

from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.tool_calls import StreamedCalls, active_tools, template_inputs, tool_spec, whole_output
from server.model.default import ensure_default_model
from server.structured.tools import CALL_CLOSE, CALL_OPEN, ToolSpec
from server.tokenizer import Tokenizer

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
         {"type": "function", "function": {"name": "now", "description": "The time"}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "RESULT-FIVE"},
    {"role": "user", "content": "Thanks. And the time?"}]


def _body(**patch) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CONVERSATION, **patch})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ensure_default_model())


def test_tool_choice_maps_to_the_grammar_mode():
    assert tool_spec(_body()) is None                                   # no tools: nothing to call
    assert tool_spec(_body(tools=TOOLS, tool_choice="none")) is None
    auto = ToolSpec.from_source(tool_spec(_body(tools=TOOLS)).source)   # tools without a choice: auto
    assert auto.mode == "auto" and auto.parallel and [n for n, _ in auto.tools] == ["add", "now"]
    one = ToolSpec.from_source(tool_spec(_body(tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False)).source)
    assert one.mode == "required" and not one.parallel
    named = ToolSpec.from_source(tool_spec(_body(tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "now"}})).source)
    assert named.mode == "required" and [n for n, _ in named.tools] == ["now"] and not named.parallel


@pytest.mark.parametrize("patch, param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "structured_outputs": {"regex": "a+"}}, "tool_choice"),
])
def test_bad_tool_requests(patch, param):
    with pytest.raises(APIError) as e:
        active_tools(_body(**patch))
    assert e.value.status == 400 and e.value.param == param
    active_tools(_body(tools=TOOLS, tool_choice="none", response_format={"type": "json_object"}))   # fine


def test_fallback_renders_the_conversation_through_the_template(tok):
    """SmolLM2's template takes no tools: the fallback prompt lists them, the assistant's call
    is written in the format the grammar enforces, and the tool result reaches the prompt."""
    assert not tok.template_takes_tools
    messages, tools = template_inputs(_body(tools=TOOLS), native=False)
    assert tools is None
    text = tok.apply_chat_template(messages)
    assert "RESULT-FIVE" in text and "<tool_response>" in text
    assert f'{CALL_OPEN}\n{{"name":"add","arguments":{{"a":2,"b":3}}}}\n{CALL_CLOSE}' in text
    assert '"name": "now"' in text and "You are terse." in text     # the tools, after the system text
    assert text.index("You are terse.") < text.index("<tools>") < text.index("What is 2+3?")
    hidden, _ = template_inputs(_body(tools=TOOLS, tool_choice="none"), native=False)
    assert "<tools>" not in tok.apply_chat_template(hidden)         # none: no call format offered


def test_a_template_that_takes_tools_gets_them(tok):
    template = ("{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }} {{ c.function.arguments.a }}{% endfor %}"
                "{% if m.tool_call_id %} FOR {{ m.tool_call_id }}{% endif %}\n{% endfor %}")
    saved = tok.hf.chat_template
    tok.hf.chat_template = template
    try:
        assert tok.template_takes_tools
        messages, tools = template_inputs(_body(tools=TOOLS), native=True)
        text = tok.apply_chat_template(messages, tools)
    finally:
        tok.hf.chat_template = saved
    assert "TOOL add\nTOOL now" in text
    assert "CALL add 2" in text                      # arguments given to the template as an object
    assert "tool: RESULT-FIVE FOR call_1" in text


def test_whole_and_streamed_outputs_agree():
    out = f'Sure.\n{CALL_OPEN}\n{{"name":"add","arguments":{{"a":2,"b":3}}}}\n{CALL_CLOSE}'
    content, calls, reason = whole_output(out, "stop")
    assert content == "Sure." and reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert whole_output("just text", "stop") == ("just text", None, "stop")
    stream = StreamedCalls()
    deltas = [d for i in range(0, len(out), 5) for d in stream.deltas(out[i:i + 5], False)] + stream.deltas("", True)
    first = next(d for d in deltas if d.tool_calls)
    assert first.tool_calls[0].id.startswith("call_") and first.tool_calls[0].function.name == "add"
    args = "".join(d.tool_calls[0].function.arguments for d in deltas if d.tool_calls)
    assert args == calls[0].function.arguments
    assert "".join(d.content or "" for d in deltas).strip() == "Sure."
    assert stream.finish_reason("stop") == "tool_calls" and stream.finish_reason("length") == "length"
