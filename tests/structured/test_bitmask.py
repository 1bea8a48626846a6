"""fill_bitmasks and apply_bitmask against per-matcher masks and a plain loop reference."""
from __future__ import annotations

import llguidance.numpy
import numpy as np
import pytest
import torch

from server.structured.bitmask import apply_bitmask, fill_bitmasks
from server.structured.grammar import new_matcher
from server.structured.spec import parse_constraint
from tests.structured.helpers import encode, schema_spec


def reference_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for i in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if t >= 32 * bitmask.shape[1] or not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                out[i, t] = float("-inf")
    return out


@pytest.mark.parametrize("n, vocab, words", [(1, 64, 2), (3, 100, 4), (4, 140, 4), (2, 50, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_matches_reference(n, vocab, words, dtype):
    g = torch.Generator().manual_seed(n * vocab)
    bitmask = torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, generator=g)
    logits = torch.randn(n, vocab, generator=g).to(dtype)
    expected = reference_apply(logits, bitmask)
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)


def test_apply_matches_llguidance_numpy():
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (8, 1536), dtype=torch.int32, generator=g)
    logits = torch.randn(8, 49152, generator=g)
    expected = logits.numpy().copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask.numpy())
    apply_bitmask(logits, bitmask)
    assert np.array_equal(logits.numpy(), expected)


def _matchers_in_various_states(compiler, hf_tokenizer):
    point = {"type": "object", "properties": {"x": {"type": "number"}, "tag": {"type": "string", "maxLength": 4}}}
    cases = [(schema_spec(point), ""), (schema_spec(point), '{"x":1'), (schema_spec(point), '{"x":1.5,"tag":"ab'),
             (parse_constraint({"type": "json_object"}, None), '{"k":['),
             (parse_constraint(None, {"choice": ["red", "green", "blue"]}), "gr"),
             (parse_constraint(None, {"regex": "[0-9]{2,4}"}), "12"),
             (schema_spec(point, "flexible"), "{"), (parse_constraint({"type": "json_object"}, None), '{"k":"v"')]
    matchers = []
    for spec, prefix in cases:
        m = new_matcher(compiler.compile(spec))
        for tok in encode(hf_tokenizer, prefix):
            m.consume(tok)
        matchers.append(m)
    return matchers


def test_fill_batch_equals_per_matcher_masks(compiler, hf_tokenizer):
    matchers = _matchers_in_various_states(compiler, hf_tokenizer)
    batch = fill_bitmasks(matchers)
    assert batch.dtype == torch.int32 and batch.device.type == "cpu"
    assert batch.shape == (len(matchers), (matchers[0].vocab_size + 31) // 32)
    for i, m in enumerate(matchers):
        own = torch.frombuffer(bytearray(m.llmatcher.compute_bitmask()), dtype=torch.int32)  # >= W words
        assert torch.equal(batch[i], own[:batch.shape[1]]) and not own[batch.shape[1]:].any()
        assert torch.equal(batch[i], fill_bitmasks([m])[0])
    assert len({tuple(row.tolist()) for row in batch}) == len(matchers)   # states really differ


def test_masked_logits_allow_only_grammar_tokens(compiler, hf_tokenizer):
    matchers = _matchers_in_various_states(compiler, hf_tokenizer)
    logits = torch.randn(len(matchers), matchers[0].vocab_size)
    apply_bitmask(logits, fill_bitmasks(matchers))
    for i, m in enumerate(matchers):
        finite = set(torch.isfinite(logits[i]).nonzero().flatten().tolist())
        assert finite == set(m.allowed_token_ids())
        best = int(logits[i].argmax())
        m.fork().consume(best)                         # the greedy pick is always consumable


def test_fill_empty_batch():
    assert fill_bitmasks([]).shape == (0, 0)

