"""Matcher: consume / is_stopped / fork against llguidance's own verdicts, over the whole vocabulary."""
from __future__ import annotations

import pytest
import torch

from server.errors import GrammarError
from server.structured.grammar import new_matcher
from server.structured.spec import parse_constraint
from tests.structured.helpers import encode, schema_spec

POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False}


def consumable(matcher, tok: int) -> bool:
    try:
        matcher.fork().consume(tok)
        return True
    except GrammarError:
        return False


def test_refused_token_raises_with_its_id(compiler, hf_tokenizer):
    m = new_matcher(compiler.compile(schema_spec(POINT)))
    bad = encode(hf_tokenizer, "[")[0]
    with pytest.raises(GrammarError, match=f"token {bad} is not allowed by the grammar after 0 tokens"):
        m.consume(bad)


def test_stopped_when_the_grammar_is_complete(compiler, hf_tokenizer):
    m = new_matcher(compiler.compile(schema_spec(POINT)))
    ids = encode(hf_tokenizer, '{"x":1,"y":-2}')
    for tok in ids[:-1]:
        m.consume(tok)
        assert not m.is_stopped() and not m.is_accepting()
    m.consume(ids[-1])
    assert m.is_stopped() and m.is_accepting() and m.num_consumed == len(ids)
    assert m.allowed_token_ids() == [m.eos_token_id]


def test_accepting_but_not_stopped_while_it_may_go_on(compiler, hf_tokenizer):
    m = new_matcher(compiler.compile(parse_constraint(None, {"choice": ["yes", "yesno"]})))
    for tok in encode(hf_tokenizer, "yes"):
        m.consume(tok)
    assert m.is_accepting() and not m.is_stopped()
    m.consume(m.eos_token_id)
    assert m.is_stopped()


def test_fork_is_independent(compiler, hf_tokenizer):
    m = new_matcher(compiler.compile(schema_spec(POINT)))
    for tok in encode(hf_tokenizer, '{"x":'):
        m.consume(tok)
    twin = m.fork()
    assert twin.num_consumed == m.num_consumed
    for tok in encode(hf_tokenizer, '12,"y":3}'):
        m.consume(tok)
    for tok in encode(hf_tokenizer, '-4,"y":50}'):
        twin.consume(tok)
    assert m.is_stopped() and twin.is_stopped()
    fresh = new_matcher(compiler.compile(schema_spec(POINT)))   # matchers of one grammar share no state
    assert fresh.num_consumed == 0 and not fresh.is_accepting()


def test_allowed_tokens_are_consumable(compiler, hf_tokenizer):
    """Every allowed token is consumable; off forced text, a random 1,000 agree both ways.

    Where the grammar forces bytes (the start of POINT forces '{"x":'), llguidance's mask
    keeps only the canonical tokens of those bytes ('{"'), while consume() also takes
    other splits ('{'): so there the check runs one way only.
    """
    m = new_matcher(compiler.compile(schema_spec(POINT)))
    sample = torch.randperm(m.vocab_size, generator=torch.Generator().manual_seed(0))[:1000].tolist()
    for prefix, both_ways in [("", False), ('{"x":1', True), ('2,"y":', True)]:
        for tok in encode(hf_tokenizer, prefix):
            m.consume(tok)
        allowed = set(m.allowed_token_ids())
        assert allowed and len(allowed) < m.vocab_size
        assert all(consumable(m, t) for t in allowed)
        if both_ways:
            assert {t for t in sample if consumable(m, t)} == allowed & set(sample)
