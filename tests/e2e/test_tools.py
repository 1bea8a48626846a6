"""Chat tools and the Responses API on a live server, through the official `openai` client.

Every returned `arguments` string must parse and validate against its function's schema,
on the base model and through an adapter, streamed and not.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import KEYS

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=KEYS["admin"], max_retries=0, timeout=120)


def _valid(calls) -> list[tuple[str, dict]]:
    out = []
    for c in calls:
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        assert c.id.startswith("call_") and c.type == "function"
        out.append((c.function.name, args))
    return out


@pytest.mark.parametrize("model", ["base", "acme-support"])
def test_required_makes_valid_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    assert len(_valid(c.message.tool_calls)) >= 1
    one = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(_valid(one.choices[0].message.tool_calls)) == 1


@pytest.mark.parametrize("model", ["base", "beta-legal"])
def test_named_choice_calls_that_function(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 plus 3?"}],
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                                       temperature=0, max_tokens=80)
    calls = _valid(r.choices[0].message.tool_calls)
    assert [name for name, _ in calls] == ["add"] and r.choices[0].finish_reason == "tool_calls"


def test_streamed_calls_equal_the_whole_answer(client):
    kw = dict(model="base", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:          # the first piece carries id, type and name
                    assert d.id and d.type == "function" and d.function.name and d.function.arguments == ""
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_auto_answers_in_text_and_streams_the_same(client):
    """auto: this model answers these prompts in text (a call under auto, made by the model
    itself, is checked in tests/structured/test_tool_generation.py); streamed, the same
    pieces arrive, and any call the model did make is valid."""
    for prompt in ("Say hello.", "What is 2+3? Use a tool call."):
        kw = dict(model="base", messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice="auto",
                  temperature=0, max_tokens=40)
        r = client.chat.completions.create(**kw).choices[0]
        assert r.message.content or r.message.tool_calls
        whole_calls = _valid(r.message.tool_calls or [])
        content, args = "", {}
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                content += ch.delta.content or ""
                for d in ch.delta.tool_calls or []:
                    args.setdefault(d.index, [d.function.name, ""])[1] += d.function.arguments or ""
        assert content.strip() == (r.message.content or "").strip()
        assert [(n, json.loads(a)) for n, a in args.values()] == whole_calls


def test_tool_conversation_renders_and_answers(client):
    """user -> call -> tool result -> final answer, through the chat template's fallback."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model="base", messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.usage.prompt_tokens > 60          # the call and its result are in the prompt


class Person(BaseModel):
    name: str
    age: int


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="acme-support", messages=[{"role": "user", "content": "Jane is 34."}],
                                      response_format=Person, temperature=0, max_tokens=60)
    assert isinstance(r.choices[0].message.parsed, Person)


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),                                    # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),                                         # duplicate names
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array", "uniqueItems": True}}}], "tool_choice": "required"}, None),  # a schema llguidance refuses
    ({"tools": TOOLS, "tool_choice": "sometimes"}, None),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400(live_server, body, param):
    r = httpx.post(live_server.url + "/v1/chat/completions", headers=live_server.headers("admin"), timeout=60,
                   json={"model": "base", "messages": ASK, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


# ---- the Responses API ---------------------------------------------------------------

RESPONSE_TOOLS = [{"type": "function", "name": "add", "description": "Add two integers", "parameters": ADD}]


@pytest.mark.parametrize("model", ["base", "shared-json"])
def test_responses_text_schema_and_tools(client, model):
    r = client.responses.create(model=model, input="Say hello.", instructions="Be brief.", max_output_tokens=12,
                                temperature=0)
    assert r.object == "response" and r.output_text and r.status in ("completed", "incomplete")
    assert r.usage.output_tokens <= 12 and r.usage.input_tokens > 0
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=model, input="Jane is 34.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    r = client.responses.create(model=model, input="What is 2+3?", tools=RESPONSE_TOOLS, tool_choice="required",
                                max_output_tokens=60, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and r.status == "completed"
    for c in calls:
        assert c.name == "add" and c.call_id.startswith("call_")
        jsonschema.validate(json.loads(c.arguments), ADD)


def test_responses_stream_events(client):
    kinds, text = [], ""
    for ev in client.responses.create(model="base", input="Say hello.", max_output_tokens=10, temperature=0,
                                      stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert text and final.output_text == text
    args, done = "", None
    for ev in client.responses.create(model="base", input="What is 2+3?", tools=RESPONSE_TOOLS,
                                      tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                      temperature=0, stream=True):
        if ev.type == "response.function_call_arguments.delta":
            args += ev.delta
        elif ev.type == "response.function_call_arguments.done":
            done = ev.arguments
        elif ev.type == "response.completed":
            final = ev.response
    assert args == done and jsonschema.validate(json.loads(args), ADD) is None
    assert [o.arguments for o in final.output if o.type == "function_call"] == [args]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    text = ""
    for ev in client.responses.create(model="acme-support", input="Jane is 34.", max_output_tokens=60, temperature=0,
                                      text={"format": {"type": "json_schema", "name": "person", "schema": schema}},
                                      stream=True):
        if ev.type == "response.output_text.delta":
            text += ev.delta
        elif ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    jsonschema.validate(json.loads(text), schema)
    assert final.output_text == text


def test_responses_items_and_refusals(live_server, client):
    r = client.responses.create(model="base", input=[
        {"role": "user", "content": "What is 2+3?"},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a":2,"b":3}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "5"}],
        tools=RESPONSE_TOOLS, tool_choice="none", max_output_tokens=16, temperature=0)
    assert r.output_text and r.usage.input_tokens > 30
    for extra, param in (({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="base", input="x", **extra)
        assert e.value.body["param"] == param
    anonymous = httpx.post(live_server.url + "/v1/responses", json={"model": "base", "input": "x"}, timeout=30)
    assert anonymous.status_code == 401                 # the same auth as chat
    stranger = httpx.post(live_server.url + "/v1/responses", headers=live_server.headers("beta"), timeout=30,
                          json={"model": "acme-support", "input": "x"})
    assert stranger.status_code == 404                  # another tenant's adapter is not found
