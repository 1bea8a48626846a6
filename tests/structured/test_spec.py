"""parse_constraint: OpenAI response_format and vLLM-style structured_outputs -> ConstraintSpec."""
from __future__ import annotations

import json

import pytest

from server.errors import GrammarError
from server.structured.spec import ConstraintSpec, parse_constraint

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


def test_no_constraint():
    assert parse_constraint(None, None) is None
    assert parse_constraint({"type": "text"}, None) is None


def test_json_object_and_json_schema():
    assert parse_constraint({"type": "json_object"}, None) == ConstraintSpec("json", '{"type":"object"}')
    spec = parse_constraint({"type": "json_schema",
                             "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}, None)
    assert (spec.kind, spec.name, spec.whitespace) == ("json", "thing", "compact")
    assert json.loads(spec.source) == SCHEMA
    assert list(json.loads(spec.source)["properties"]) == ["b", "a"]   # property order is meaning


def test_structured_outputs_kinds():
    assert parse_constraint(None, {"regex": "[0-9]+"}) == ConstraintSpec("regex", "[0-9]+")
    assert parse_constraint(None, {"choice": ["yes", "no"]}) == ConstraintSpec("choice", '["yes","no"]')
    assert parse_constraint(None, {"grammar": 'start: "x"'}) == ConstraintSpec("grammar", 'start: "x"')
    assert parse_constraint(None, {"json": SCHEMA}).source == parse_constraint(None, {"json": json.dumps(SCHEMA)}).source
    assert parse_constraint(None, {"json_object": True}) == parse_constraint({"type": "json_object"}, None)


def test_whitespace_option():
    flexible = parse_constraint({"type": "json_object"}, {"whitespace": "flexible"})
    assert flexible.whitespace == "flexible"
    assert parse_constraint(None, {"json": SCHEMA, "whitespace": "compact"}).whitespace == "compact"
    assert flexible.cache_key != parse_constraint({"type": "json_object"}, None).cache_key


def test_close_within_option():
    spec = parse_constraint({"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}},
                            {"close_within": 32, "whitespace": "flexible"})
    assert (spec.close_within, spec.whitespace, spec.name) == (32, "flexible", "t")
    assert parse_constraint(None, {"json": SCHEMA}).close_within is None   # unset: derived from max_tokens
    assert parse_constraint(None, {"json": SCHEMA, "close_within": 0}).close_within == 0   # opted out
    # not part of the grammar: the same compiled grammar serves every budget
    assert spec.cache_key == parse_constraint(None, {"json": SCHEMA, "whitespace": "flexible"}).cache_key


def test_cache_key_ignores_name_but_not_schema():
    a = parse_constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}, None)
    b = parse_constraint({"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMA}}, None)
    c = parse_constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string"}}}, None)
    assert a.cache_key == b.cache_key != c.cache_key


@pytest.mark.parametrize("response_format, structured_outputs, message", [
    ("json", None, "response_format must be an object"),
    ({"type": "xml"}, None, "response_format.type must be"),
    ({"type": "json_schema"}, None, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, None, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, None, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, None, "name must be a string"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, None, "strict must be a boolean"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "shema": {}}}, None, "unknown fields ['shema']"),
    (None, {"regex": "a", "choice": ["a"]}, "takes one of"),
    (None, {"regx": "a"}, "unknown fields ['regx']"),
    (None, {"choice": []}, "non-empty list of strings"),
    (None, {"choice": ["a", 1]}, "non-empty list of strings"),
    (None, {"regex": ""}, "non-empty string"),
    (None, {"json": "{not json"}, "structured_outputs.json is not valid JSON"),
    (None, {"json_object": False}, "json_object must be true"),
    (None, {"whitespace": "loose"}, "whitespace must be one of"),
    (None, {"whitespace": "flexible"}, "needs a JSON constraint"),
    (None, {"regex": "a", "whitespace": "flexible"}, "JSON constraints only"),
    (None, {"json_object": True, "close_within": -1}, "close_within must be an integer in 0..4096"),
    (None, {"json_object": True, "close_within": "8"}, "close_within must be an integer"),
    (None, {"json_object": True, "close_within": True}, "close_within must be an integer"),
    (None, {"json_object": True, "close_within": 5000}, "close_within must be an integer"),
    (None, {"close_within": 8}, "needs a JSON constraint"),
    (None, {"choice": ["a"], "close_within": 8}, "JSON constraints only"),
    ({"type": "json_object"}, {"regex": "a"}, "not both"),
    (None, "regex", "structured_outputs must be an object"),
])
def test_malformed_input_is_a_grammar_error(response_format, structured_outputs, message):
    with pytest.raises(GrammarError) as e:
        parse_constraint(response_format, structured_outputs)
    assert message in str(e.value)


def test_spec_validates_itself():
    with pytest.raises(GrammarError, match="kind must be one of"):
        ConstraintSpec("yaml", "x")
    with pytest.raises(GrammarError, match="whitespace must be one of"):
        ConstraintSpec("json", "{}", "loose")
    with pytest.raises(GrammarError, match="close_within applies to JSON constraints only"):
        ConstraintSpec("regex", "a+", close_within=4)


def test_nesting_depth_is_measured_without_recursion():
    from server.structured.spec import nesting_depth
    assert nesting_depth({}) == 1 and nesting_depth({"a": [1, {"b": []}]}) == 4 and nesting_depth("x") == 0
    deep: list = []
    for _ in range(100000):                      # far past Python's recursion limit
        deep = [deep]
    assert nesting_depth(deep) == 100001


def test_too_deep_schemas_and_too_many_choices_are_refused():
    from server.structured.spec import MAX_CHOICES, MAX_SCHEMA_DEPTH
    schema: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        schema = {"type": "array", "items": schema}
    with pytest.raises(GrammarError, match="nested more than"):
        parse_constraint({"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}, None)
    with pytest.raises(GrammarError, match="nested more than"):
        parse_constraint(None, {"json": schema})
    with pytest.raises(GrammarError, match="not valid JSON"):
        parse_constraint(None, {"json": "[" * 100000 + "]" * 100000})
    with pytest.raises(GrammarError, match=f"at most {MAX_CHOICES}"):
        parse_constraint(None, {"choice": [str(i) for i in range(MAX_CHOICES + 1)]})
    assert parse_constraint(None, {"choice": [str(i) for i in range(MAX_CHOICES)]}).kind == "choice"
