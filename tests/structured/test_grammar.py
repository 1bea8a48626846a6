"""GrammarCompiler: refusals with llguidance's reason, the cache, async compile with a time
limit, and what each constraint kind accepts (through Matcher.consume, token by token)."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest

from server.errors import GrammarError
from server.structured.grammar import GrammarCompiler
from server.structured.spec import ConstraintSpec, parse_constraint
from tests.structured.helpers import accepts, compact, encode, schema_spec

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def ok(compiler, hf_tokenizer, spec: ConstraintSpec, text: str) -> bool:
    return accepts(compiler.compile(spec), encode(hf_tokenizer, text))[0]


@pytest.mark.parametrize("schema, message", [
    ({"type": "array", "uniqueItems": True}, 'is not supported: Unimplemented keys: ["uniqueItems"]'),
    ({"not": {"type": "string"}}, 'is not supported: Unimplemented keys: ["not"]'),
    ({"type": "strng"}, "is not supported: Invalid type: strng"),
    ({"type": "string", "format": "color"}, "is not supported: Unknown format: color"),
    ({"$ref": "#/$defs/missing"}, "is not supported: Pointer '/$defs/missing' does not exist"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "cannot be satisfied: Unsatisfiable schema: minimum (5)"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "cannot be satisfied: Unsatisfiable schema"),
    ({"enum": []}, "cannot be satisfied"),
])
def test_refused_schemas_carry_llguidance_reason(compiler, schema, message):
    with pytest.raises(GrammarError) as e:
        compiler.compile(schema_spec(schema))
    assert str(e.value).startswith("JSON schema ")
    assert message in str(e.value)


def test_x_guidance_cannot_switch_enforcement_off(compiler):
    schema = {"x-guidance": {"lenient": True, "coerce_one_of": True}, "type": "array", "uniqueItems": True}
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.compile(schema_spec(schema))


def test_malformed_regex_and_lark(compiler):
    with pytest.raises(GrammarError, match="(?s)regex is not supported: .*unclosed character class"):
        compiler.compile(ConstraintSpec("regex", "[0-9"))
    with pytest.raises(GrammarError, match="(?s)Lark grammar is not supported: .*Expected"):
        compiler.compile(ConstraintSpec("grammar", "start: ( "))


def test_json_schema_compact_by_default(compiler, hf_tokenizer):
    spec = parse_constraint({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, None)
    assert ok(compiler, hf_tokenizer, spec, '{"name":"Ada","age":36}')
    assert not ok(compiler, hf_tokenizer, spec, '{"name": "Ada", "age": 36}')       # whitespace
    assert not ok(compiler, hf_tokenizer, spec, '{"name":"Ada","age":-1}')          # minimum
    assert not ok(compiler, hf_tokenizer, spec, '{"name":"Ada"}')                   # required
    assert not ok(compiler, hf_tokenizer, spec, '{"name":"Ada","age":36,"x":1}')    # additionalProperties
    assert not ok(compiler, hf_tokenizer, spec, '{"age":36,"name":"Ada"}')          # schema's property order


def test_whitespace_opt_in(compiler, hf_tokenizer):
    pretty = json.dumps({"name": "Ada", "age": 36}, indent=2)
    flexible = parse_constraint({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
                                {"whitespace": "flexible"})
    assert ok(compiler, hf_tokenizer, flexible, pretty)
    assert ok(compiler, hf_tokenizer, flexible, '{"name":"Ada","age":36}')
    in_schema = schema_spec({**PERSON, "x-guidance": {"whitespace_flexible": True}})
    assert ok(compiler, hf_tokenizer, in_schema, pretty)
    assert not ok(compiler, hf_tokenizer, schema_spec(PERSON), pretty)


def test_json_object(compiler, hf_tokenizer):
    spec = parse_constraint({"type": "json_object"}, None)
    assert ok(compiler, hf_tokenizer, spec, '{"a":[1,2.5,"x",null,true],"b":{}}')
    assert not ok(compiler, hf_tokenizer, spec, '[1,2]')
    assert not ok(compiler, hf_tokenizer, spec, '```json\n{"a":1}\n```')
    assert not ok(compiler, hf_tokenizer, spec, '{"a":1')


def test_regex_choice_and_lark(compiler, hf_tokenizer):
    regex = ConstraintSpec("regex", r"[0-9]{3}-[a-z]+")
    assert ok(compiler, hf_tokenizer, regex, "123-abc")
    assert not ok(compiler, hf_tokenizer, regex, "12-abc")
    assert not ok(compiler, hf_tokenizer, regex, "123-abc ")
    choice = parse_constraint(None, {"choice": ["yes", "no", 'say "hi"', "naïve 😀", "a|b"]})
    for c in ["yes", "no", 'say "hi"', "naïve 😀", "a|b"]:
        assert ok(compiler, hf_tokenizer, choice, c), c
    for c in ["ye", "yes!", "a", "maybe"]:
        assert not ok(compiler, hf_tokenizer, choice, c), c
    lark = ConstraintSpec("grammar", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]+/')
    assert ok(compiler, hf_tokenizer, lark, "(1,22,333)")
    assert not ok(compiler, hf_tokenizer, lark, "(1,,2)")


def test_cache_returns_the_same_compiled_grammar(hf_tokenizer):
    compiler = GrammarCompiler(hf_tokenizer, cache_size=2)
    try:
        a = compiler.compile(schema_spec(PERSON))
        assert compiler.compile(schema_spec(json.loads(compact(PERSON)))) is a
        named = parse_constraint({"type": "json_schema", "json_schema": {"name": "other", "schema": PERSON}}, None)
        assert compiler.compile(named) is a                         # the name is not part of the key
        assert compiler.compile(schema_spec(PERSON, "flexible")) is not a
        with pytest.raises(GrammarError) as first:
            compiler.compile(schema_spec({"type": "array", "uniqueItems": True}))
        with pytest.raises(GrammarError) as again:                # refusals are cached too
            compiler.compile(schema_spec({"type": "array", "uniqueItems": True}))
        assert again.value is first.value
        assert compiler.compile(schema_spec(PERSON)) is not a      # LRU of 2 evicted it
    finally:
        compiler.close()


def test_compile_async_runs_off_the_loop(compiler):
    loop_thread = threading.get_ident()
    seen = []
    original = compiler._build

    def build(spec):
        seen.append(threading.get_ident())
        return original(spec)

    compiler._build = build
    try:
        compiled = asyncio.run(compiler.compile_async(schema_spec({"type": "array", "items": {"type": "number"}})))
    finally:
        del compiler._build
    assert compiled.spec.kind == "json" and seen and seen[0] != loop_thread


def test_compile_time_limit(hf_tokenizer):
    compiler = GrammarCompiler(hf_tokenizer, timeout_s=0.05)
    release = threading.Event()
    original = compiler._build

    def slow_build(spec):
        release.wait(5)
        return original(spec)

    compiler._build = slow_build
    try:
        spec = schema_spec({"type": "boolean"})
        with pytest.raises(GrammarError, match="took longer than 0.05 s to compile"):
            compiler.compile(spec)
        with pytest.raises(GrammarError, match="took longer than 0.05 s"):
            asyncio.run(compiler.compile_async(spec))
        release.set()                              # the compilation was not cancelled: it lands in the cache
        compiler.timeout_s = 5.0
        assert compiler.compile(spec).spec == spec
    finally:
        release.set()
        compiler.close()
