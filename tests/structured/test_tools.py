"""server/structured/tools.py and tool_parser.py: the tool-call grammar enforces calls, the parser reads them back."""
from __future__ import annotations

import json

import pytest
import torch

from server.structured.grammar import new_matcher
from server.structured.spec import ConstraintSpec
from server.structured.tool_parser import ToolCallParser, parse_output
from server.structured.tools import CALL_CLOSE, CALL_OPEN, ToolSpec, call_schema, closed_objects

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"]}
ADD = {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}
TOOLS = (("get_weather", WEATHER), ("add", ADD))
GOOD = f'{CALL_OPEN}\n{{"name":"get_weather","arguments":{{"city":"Paris","days":3}}}}\n{CALL_CLOSE}'
SECOND = f'\n{CALL_OPEN}\n{{"name":"add","arguments":{{"a":1}}}}\n{CALL_CLOSE}'


@pytest.fixture(scope="module")
def tok(hf_tokenizer):
    return hf_tokenizer


def _matcher(compiler, mode, parallel, tools=TOOLS):
    return new_matcher(compiler.compile(ConstraintSpec("tools", ToolSpec(mode, parallel, tools).source())))


def _feed(tok, m, text) -> bool:
    """Consume text token by token while the grammar allows it -> whether all of it was allowed."""
    for t in tok.encode(text, add_special_tokens=False):
        if t not in set(m.allowed_token_ids()):
            return False
        m.consume(t)
    return True


@pytest.mark.parametrize("mode, parallel", [("required", True), ("required", False), ("auto", True), ("auto", False)])
def test_grammar_allows_valid_calls_only(tok, compiler, mode, parallel):
    prefix = "Let me check. " if mode == "auto" else ""
    m = _matcher(compiler, mode, parallel)
    assert _feed(tok, m, prefix + GOOD) and m.is_accepting()
    assert _feed(tok, m, SECOND) == parallel                      # a second call only when parallel
    for bad in ('{"name":"get_weather","arguments":{"town"', '{"name":"nope"', '{"name":"add","arguments":{"a":"x'):
        assert not _feed(tok, _matcher(compiler, mode, parallel), f"{prefix}{CALL_OPEN}\n{bad}")
    if mode == "required":                                        # no text before the call
        assert not _feed(tok, _matcher(compiler, mode, parallel), "Sure")


def test_auto_allows_text_and_enforces_a_call_from_its_tag(tok, compiler):
    m = _matcher(compiler, "auto", True)
    assert _feed(tok, m, "Plain text, no call at all.") and m.is_accepting()
    m = _matcher(compiler, "auto", True)
    assert _feed(tok, m, f"Hello {CALL_OPEN}")
    assert [tok.decode([t]) for t in m.allowed_token_ids()] == ["\n"]    # the call has begun


def test_parameters_with_refs_and_closed_objects(tok, compiler):
    """pydantic's nested models come with $defs and $refs; they compile inside the call."""
    nested = {"$defs": {"Addr": {"type": "object", "properties": {"zip": {"type": "string"}}, "required": ["zip"]}},
              "type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}}, "required": ["home"]}
    m = _matcher(compiler, "required", False, (("move", nested),))
    assert _feed(tok, m, f'{CALL_OPEN}\n{{"name":"move","arguments":{{"home":{{"zip":"123"}}}}}}\n{CALL_CLOSE}')
    m = _matcher(compiler, "required", False, (("move", nested),))
    assert not _feed(tok, m, f'{CALL_OPEN}\n{{"name":"move","arguments":{{"home":{{"zip":"1","x"')  # closed
    schema = call_schema((("move", nested),))
    assert schema["$defs"]["t0"]["properties"]["home"] == {"$ref": "#/$defs/t0.Addr"}
    named_properties = {"type": "object", "properties": {"properties": {"type": "string"}}}
    assert closed_objects(named_properties) == {**named_properties, "additionalProperties": False}
    assert closed_objects({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"]


def test_parser_streams_what_the_whole_parse_reads():
    text = "Let me see. " + GOOD + SECOND
    content, calls = parse_output(text)
    assert content == "Let me see."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "days": 3}),
                                                                  ("add", {"a": 1})]
    p = ToolCallParser()
    events = [e for ch in text for e in p.push(ch)] + p.finish()      # one character at a time
    assert "".join(e.text for e in events if e.kind == "content").strip() == content
    assert [e.text for e in events if e.kind == "name"] == ["get_weather", "add"]
    for i, c in enumerate(calls):
        assert "".join(e.text for e in events if e.kind == "arguments" and e.index == i) == c.arguments
    assert not any(CALL_OPEN[:3] in e.text for e in events if e.kind == "content")   # tags never leak


def test_tricky_strings_and_cut_calls():
    _, calls = parse_output(f'{CALL_OPEN}\n{{"name":"f","arguments":{{"x":"a}}b\\"{{"}}}}\n{CALL_CLOSE}')
    assert json.loads(calls[0].arguments) == {"x": 'a}b"{'}
    cut = f'Hi {CALL_OPEN}\n{{"name":"f","arguments":{{"x":"abc'
    content, calls = parse_output(cut)
    assert calls == [] and content == cut                          # nothing lost
    p = ToolCallParser()
    events = p.push(cut) + p.finish(unfinished_as_content=False)    # a stream already sent the pieces
    assert [e.kind for e in events] == ["content", "name", "arguments"]


def test_closing_rule_for_tools(tok, compiler):
    """Inside a call the JSON closes; after a complete call the output ends; free text before
    any call is left as it is (an auto text answer)."""
    m = _matcher(compiler, "auto", True)
    vocab = m.vocab_size
    free = torch.zeros(vocab)
    m.close(free, "Some text")
    assert bool(torch.isfinite(free).all())
    inside = _matcher(compiler, "required", True)
    text = f'{CALL_OPEN}\n{{"name":"get_weather","arguments":{{"city":"Par'
    assert _feed(tok, inside, text)
    row = torch.full((vocab,), float("-inf"))
    row[inside.allowed_token_ids()] = 0
    inside.close(row, text)
    kept = [tok.decode([t]) for t in torch.isfinite(row).nonzero().flatten().tolist()]
    assert kept and all(k.startswith('"') for k in kept)           # the string closes now
    after = _matcher(compiler, "required", True)
    assert _feed(tok, after, GOOD)
    row = torch.full((vocab,), float("-inf"))
    row[after.allowed_token_ids()] = 0
    after.close(row, GOOD)
    assert torch.isfinite(row).nonzero().flatten().tolist() == [after.eos_token_id]


def test_a_repeated_call_turns_the_closing_rule_on(tok, compiler):
    from server.structured.tools import repeats_a_call
    m = _matcher(compiler, "required", True)
    assert not m.repeating(GOOD) and not m.repeating(GOOD + SECOND)
    assert not m.repeating(GOOD + "\n" + GOOD[:-3])                # not complete yet
    assert m.repeating(GOOD + "\n" + GOOD) and repeats_a_call(GOOD + SECOND + "\n" + GOOD)
    assert not _matcher(compiler, "auto", True).repeating("text") and not repeats_a_call("")
