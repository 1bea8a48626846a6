"""WireRequest: what crosses to a replica rebuilds the same request there, constraint included."""
from __future__ import annotations

import pickle
import time

import pytest
import torch
from transformers import AutoTokenizer

from server.deploy.wire import WireRequest
from server.engine.request import Request, SamplingParams
from server.model.default import ensure_default_model
from server.structured.grammar import GrammarCompiler, fill_bitmasks, new_matcher, parse_constraint

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["city", "n"]}


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


@pytest.fixture(scope="module")
def compiler(hf_tokenizer):
    c = GrammarCompiler(hf_tokenizer)
    yield c
    c.close()


def test_a_constrained_request_arrives_whole_and_at_the_grammars_start(compiler, hf_tokenizer):
    spec = parse_constraint({"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}, None)
    here = new_matcher(compiler.compile(spec), 7)
    req = Request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0.5, seed=9, logit_bias=((5, 1.0),)),
                  adapter="acme", constraint=here, deadline=time.monotonic() + 30.0, cache_salt="t:acme")
    wire = pickle.loads(pickle.dumps(WireRequest.of(req, adapters_version=4)))   # as Ray sends it
    assert wire.adapters_version == 4 and wire.spec == spec and wire.close_within == 7
    there = wire.to_request(compiler.compile(wire.spec))
    assert (there.prompt_ids, there.params, there.adapter, there.request_id, there.cache_salt) == \
           (req.prompt_ids, req.params, req.adapter, req.request_id, req.cache_salt)
    assert there.constraint.spec == spec and there.constraint.close_within == 7
    assert 29.0 < there.deadline - time.monotonic() <= 30.0
    # the same grammar at the same point: equal masks, and they stay equal token after token
    tokens = hf_tokenizer.encode('{"city":"Oslo","n":3}')
    assert len(tokens) > 5
    for t in tokens:
        assert torch.equal(fill_bitmasks([here]), fill_bitmasks([there.constraint]))
        here.consume(t)
        there.constraint.consume(t)
    assert here.is_stopped() == there.constraint.is_stopped()
    assert not torch.equal(fill_bitmasks([there.constraint]), fill_bitmasks([new_matcher(compiler.compile(spec))]))


def test_an_unconstrained_request_has_no_spec_and_no_deadline():
    req = Request([4, 5], SamplingParams(max_tokens=3), adapter=None)
    wire = pickle.loads(pickle.dumps(WireRequest.of(req, 0)))
    there = wire.to_request(None)
    assert wire.spec is None and there.constraint is None and there.deadline is None
    assert there.prompt_ids == [4, 5] and there.params == req.params


def test_a_constraint_without_its_spec_is_refused():
    class Bare:
        close_within = 0
    with pytest.raises(TypeError, match="without its spec"):
        WireRequest.of(Request([1], SamplingParams(), constraint=Bare()), 0)
