"""Sampler: greedy, top-k, top-p, seeds independent of the batch, logprobs."""
import math

import torch

from server.engine.request import SamplingParams
from server.engine.sampler import Sampler, _filter_top_k_top_p, _penalize


def logits(n=6, v=50, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    x = logits()
    s = Sampler("cpu", seed=1)
    greedy = s.sample(x, [SamplingParams(temperature=0.0)] * 6, [f"r{i}" for i in range(6)])
    assert greedy.token_ids == x.argmax(-1).tolist()
    k1 = s.sample(x, [SamplingParams(temperature=1.5, top_k=1)] * 6, [f"r{i}" for i in range(6)])
    assert k1.token_ids == greedy.token_ids


def test_seeded_request_same_alone_or_in_any_batch():
    x = logits(8, 100) / 3
    p = SamplingParams(temperature=1.0, seed=1234)
    s = Sampler("cpu", 0)
    seq_alone = [s.sample(x[3:4], [p], ["me"]).token_ids[0] for _ in range(20)]
    s2 = Sampler("cpu", 99)
    others = [SamplingParams(temperature=1.0)] * 7 + [SamplingParams(temperature=0.7, seed=5)]
    seq_batched = []
    for t in range(20):
        rows = torch.cat([x[:3], x[3:4], x[4:]])      # the same row among 7 others, order varies
        order = list(range(8))
        order.insert(t % 8, order.pop(3))
        params = [others[i] if i != 3 else p for i in range(8)]
        keys = [f"o{i}" if i != 3 else "me" for i in range(8)]
        out = s2.sample(rows[order], [params[i] for i in order], [keys[i] for i in order])
        seq_batched.append(out.token_ids[order.index(3)])
    assert seq_batched == seq_alone
    assert len(set(seq_alone)) > 3                    # it really samples


def test_sampling_frequencies_follow_softmax():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = Sampler("cpu", 3)
    n = 4000
    counts = torch.zeros(4)
    p = [SamplingParams(temperature=0.5)] * n
    toks = s.sample(x.expand(n, 4).contiguous(), p, [str(i) for i in range(n)]).token_ids
    counts += torch.bincount(torch.tensor(toks), minlength=4)
    expect = torch.softmax(x[0] / 0.5, -1) * n
    assert torch.all((counts - expect).abs() < 4 * expect.sqrt() + 5), (counts, expect)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    x = probs.log()
    for top_p, kept in [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.95, 4), (1.0, 4)]:
        out = _filter_top_k_top_p(x, [SamplingParams(top_p=top_p)])
        assert torch.isfinite(out).sum().item() == kept, top_p
    out = _filter_top_k_top_p(x[:, [2, 0, 3, 1]], [SamplingParams(top_p=0.6)])   # order-independent
    assert torch.isfinite(out[0]).tolist() == [False, True, False, True]
    s = Sampler("cpu", 0)
    toks = s.sample(x.expand(500, 4).contiguous(), [SamplingParams(top_p=0.6)] * 500,
                    [str(i) for i in range(500)]).token_ids
    assert set(toks) == {0, 1}


def test_logprobs_of_raw_logits_before_temperature():
    x = logits(3, 40)
    x[1, 5] = float("-inf")                              # as a grammar mask leaves it
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.7, logprobs=0),
              SamplingParams(temperature=0.0)]
    out = Sampler("cpu", 0).sample(x, params, ["a", "b", "c"])
    ref = torch.log_softmax(x.double(), -1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == x[0].argmax().item()
    assert math.isclose(lp.logprob, ref[0, lp.token_id].item(), abs_tol=1e-5)
    top = ref[0].topk(3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert all(math.isclose(v, r, abs_tol=1e-5) for (_, v), r in zip(lp.top, top.values.tolist()))
    assert out.logprobs[1].top == [] and out.token_ids[1] != 5
    assert math.isclose(out.logprobs[1].logprob, ref[1, out.token_ids[1]].item(), abs_tol=1e-5)
    assert out.logprobs[2] is None


def test_penalties_match_an_fp64_loop():
    """frequency/presence over the output, repetition over prompt + output; -inf stays -inf."""
    x = logits(3, 50, seed=3)
    x[1, 7] = float("-inf")  # a grammar-masked token stays masked
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.3),
              SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.0)]
    history = [([1, 2], [5, 5, 9]), ([4, 7], [4, 11, 12]), ([5], [5, 5])]
    ref = x.double().clone()
    for t in {5, 9}:
        ref[0, t] -= 0.7 * history[0][1].count(t) + 0.3
    for t in {4, 7, 11, 12}:
        ref[1, t] = ref[1, t] / 1.3 if ref[1, t] > 0 else ref[1, t] * 1.3
    before = x.clone()
    out = Sampler("cpu", 0).sample(x, params, ["a", "b", "c"], history)
    assert out.token_ids == ref.argmax(dim=-1).tolist()
    assert torch.equal(x, before)  # the caller's logits are not modified
    for i, p in enumerate(params):
        row = x[i].clone()
        _penalize(row, p, *history[i])
        finite = ref[i].isfinite()
        assert torch.equal(row.isneginf(), ref[i].isneginf())
        assert torch.allclose(row.double()[finite], ref[i][finite], atol=1e-5)
    # a penalty large enough changes the greedy choice: the argmax token, once repeated, loses
    top = int(x[2].argmax())
    hit = Sampler("cpu", 0).sample(x[2:], [SamplingParams(temperature=0.0, frequency_penalty=2.0)], ["d"],
                                   [([], [top] * 20)])
    assert hit.token_ids != [top]


def test_top_k_past_the_vocabulary_keeps_everything():
    x = torch.randn(2, 50)
    out = _filter_top_k_top_p(x, [SamplingParams(top_k=10**30), SamplingParams(top_k=50)])
    assert torch.equal(out, x)


def test_logit_bias_adds_to_its_row_only_and_is_validated():
    import pytest

    from server.engine.request import SamplingParamsError
    from server.engine.sampler import apply_logit_bias
    x = logits(3, 20)
    biased = x.clone()
    params = [SamplingParams(), SamplingParams(logit_bias=((4, 100.0), (7, -2.5), (4, 0.5))), SamplingParams()]
    apply_logit_bias(biased, params)
    expected = x.clone()
    expected[1, 4] += 100.5          # repeated ids add up
    expected[1, 7] -= 2.5
    assert torch.equal(biased, expected)
    for bad in (((1, 100.01),), ((1, -101.0),), ((-1, 1.0),), ((1, float("nan")),), (("1", 1.0),),
                tuple((i, 1.0) for i in range(1025))):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(logit_bias=bad)
        assert e.value.param == "logit_bias"
