"""Engine on the default model (quantization none): batch invariance under preemption with
mixed adapters, finish reasons, abort, logprobs, KV accounting."""
import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.offline import generate
from server.engine.request import FinishReason, Request, SamplingParams, SamplingParamsError
from server.errors import AdapterError, PromptTooLongError
from server.lora.adapter import TARGETS, LoraArch, write_random_adapter

WORDS = ("the quick brown fox jumps over a lazy dog while seven sailors sing songs about "
         "distant islands and forgotten maps of the northern sea").split()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    adapters = tmp_path_factory.mktemp("adapters")
    # 8 blocks x 16 = 128 tokens of KV: each prompt fits alone, all 16 together do not.
    config = EngineConfig(quantization="none", block_size=16, num_kv_blocks=8, max_num_seqs=16,
                          max_num_batched_tokens=512, adapters_dir=str(adapters), max_loras=2,
                          max_cpu_loras=4, lora_wait_steps=2)
    eng = Engine(config)
    arch = LoraArch.from_layers(eng.model.lora_linears())
    for i, name in enumerate(("ad0", "ad1", "ad2")):
        write_random_adapter(str(adapters / name), arch, r=8, alpha=16.0, targets=TARGETS, seed=i, std=0.1)
    return eng


def prompts(tok, n=16):
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + 2 * i)]   # 1..31 words
        out.append(tok.encode(f"Story {i}: " + " ".join(words)))
    return out


@pytest.mark.slow
def test_batch_invariance_with_preemption_and_adapters(engine):
    ps = prompts(engine.tokenizer)
    adapters = [(None, "ad0", "ad1", "ad2")[i % 4] for i in range(len(ps))]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = [generate(engine, [p], params, [a])[0] for p, a in zip(ps, adapters)]
    assert engine.pool.num_used == 0
    preempted_before = engine.scheduler.num_preemptions
    together = generate(engine, ps, params, adapters)
    assert engine.scheduler.num_preemptions > preempted_before, "the small pool should force preemption"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a.token_ids == b.token_ids, f"prompt {i} (adapter {adapters[i]}) differs in a batch"
        assert a.text == b.text and len(a.token_ids) == 6 and b.finish_reason == FinishReason.LENGTH
    assert engine.pool.num_used == 0 and engine.pool.num_free == engine.pool.num_blocks
    assert not engine.has_unfinished()
    # adapters really change the output (random non-zero B): same prompt, base vs adapter
    base = generate(engine, [ps[1]], params, [None])[0]
    assert base.token_ids != alone[1].token_ids


def test_finish_reasons_stop_strings_and_eos(engine):
    tok = engine.tokenizer
    chat = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    free = generate(engine, [chat], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert free.finish_reason == FinishReason.STOP and free.token_ids[-1] in engine.eos_token_ids
    assert "Paris" in free.text and "<|im_end|>" not in free.text
    assert free.text == tok.decode(free.token_ids)
    cut = free.text.index("Paris")
    stopped = generate(engine, [chat], SamplingParams(max_tokens=40, temperature=0.0, stop=("Paris",)))[0]
    assert stopped.finish_reason == FinishReason.STOP and stopped.text == free.text[:cut]
    by_id = generate(engine, [chat], SamplingParams(max_tokens=40, temperature=0.0,
                                                    stop_token_ids=(free.token_ids[1],)))[0]
    assert by_id.token_ids == free.token_ids[:2] and by_id.text == tok.decode(free.token_ids[:1])
    longer = generate(engine, [chat], SamplingParams(max_tokens=len(free.token_ids) + 3, temperature=0.0,
                                                    ignore_eos=True))[0]
    assert longer.finish_reason == FinishReason.LENGTH and len(longer.token_ids) == len(free.token_ids) + 3
    assert longer.token_ids[:len(free.token_ids)] == free.token_ids


def test_logprobs_match_a_full_forward(engine):
    ids = engine.tokenizer.encode("The capital of France is")
    out = generate(engine, [ids], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))[0]
    assert len(out.logprobs) == 3
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == lp.top[0][0] and lp.logprob == pytest.approx(lp.top[0][1])
    assert all(lp.logprob <= 0 for lp in out.logprobs) and all(len(lp.top) == 2 for lp in out.logprobs)
    from transformers import AutoModelForCausalLM
    from server.model.loader import resolve_model_dir
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("default")), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids + out.token_ids[:2]])).logits[0, -3:].double(), -1)
    for t, lp in enumerate(out.logprobs):
        assert lp.token_id == int(ref[t].argmax())
        assert lp.logprob == pytest.approx(ref[t, lp.token_id].item(), abs=2e-3)


def test_abort_and_errors_leave_no_blocks(engine):
    ids = engine.tokenizer.encode("Count: one two three")
    reqs = [Request(list(ids), SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True))
            for i in range(3)]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine.pool.num_used > 0
    out = engine.abort(reqs[1].request_id)
    assert out.finished and out.finish_reason == FinishReason.ABORT and engine.abort(reqs[1].request_id) is None
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_used == 0 and len(reqs[0].output_ids) == 20
    with pytest.raises(PromptTooLongError):
        engine.add_request(Request(list(range(5, 200)), SamplingParams()))
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        engine.add_request(Request(list(ids), SamplingParams(), adapter="nope"))
    assert not engine.has_unfinished() and engine.snapshot().kv_blocks_used == 0


def test_logit_bias_forces_and_bans_tokens_and_never_beats_the_grammar(engine):
    import dataclasses
    import json

    from server.structured.grammar import GrammarCompiler, new_matcher
    from server.structured.spec import ConstraintSpec
    tok = engine.tokenizer
    ids = tok.encode("The capital of France is")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    free = generate(engine, [ids], params)[0]
    banana = tok.encode(" banana")[0]
    assert banana not in free.token_ids
    forced = generate(engine, [ids], dataclasses.replace(params, logit_bias=((banana, 100.0),)))[0]
    assert forced.token_ids == [banana] * 4
    first = free.token_ids[0]
    banned = generate(engine, [ids], dataclasses.replace(params, logit_bias=((first, -100.0),)))[0]
    assert first not in banned.token_ids and banned.token_ids != free.token_ids
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        engine.add_request(Request(list(ids), dataclasses.replace(params, logit_bias=((tok.vocab_size, 1.0),))))
    # the grammar mask comes after the bias: +100 on a token compact JSON never allows (a
    # newline) changes nothing in a constrained output, while an unconstrained one takes it
    newline = tok.encode("\n")[-1]
    assert tok.decode([newline]) == "\n"
    bias = ((newline, 100.0),)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    compiled = GrammarCompiler(tok.hf).compile(ConstraintSpec("json", json.dumps(schema)))
    chat = tok.encode_chat([{"role": "user", "content": "Describe Paris as JSON."}])
    loose = generate(engine, [chat], dataclasses.replace(params, max_tokens=3, logit_bias=bias))[0]
    assert loose.token_ids == [newline] * 3
    req = Request(list(chat), SamplingParams(max_tokens=40, temperature=0.0, logit_bias=bias),
                  constraint=new_matcher(compiled))
    text, ids2 = "", []
    engine.add_request(req)
    while engine.has_unfinished():
        for o in engine.step():
            text += o.new_text
            ids2 += o.new_token_ids
    assert newline not in ids2 and isinstance(json.loads(text)["city"], str)


def test_grammar_constraint_gives_valid_json(engine):
    import json

    import jsonschema

    from server.structured.grammar import GrammarCompiler, new_matcher
    from server.structured.spec import ConstraintSpec

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "is_capital": {"type": "boolean"}},
              "required": ["city", "is_capital"], "additionalProperties": False}
    compiler = GrammarCompiler(engine.tokenizer.hf)
    compiled = compiler.compile(ConstraintSpec("json", json.dumps(schema)))
    chat = engine.tokenizer.encode_chat([{"role": "user", "content": "Describe Paris as JSON."}])
    reqs = [Request(list(chat), SamplingParams(max_tokens=60, temperature=t, seed=3),
                    constraint=new_matcher(compiled)) for t in (0.0, 1.0)]
    reqs.append(Request(list(chat), SamplingParams(max_tokens=5, temperature=0.0)))   # unconstrained row
    texts = {r.request_id: "" for r in reqs}
    finish = {}
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            if out.finished:
                finish[out.request_id] = out.finish_reason
    for r in reqs[:2]:
        assert finish[r.request_id] == FinishReason.STOP, texts[r.request_id]
        jsonschema.validate(json.loads(texts[r.request_id]), schema)
    assert finish[reqs[2].request_id] == FinishReason.LENGTH and engine.pool.num_used == 0
    compiler.close()


def test_close_within_ends_a_rambling_json_value_inside_the_budget(engine):
    """A schema with free strings: greedy runs to max_tokens; with close_within the same tokens
    come out until the budget starts, then the value is closed, valid, with reason "stop"."""
    import json

    import jsonschema

    from server.structured.grammar import GrammarCompiler, new_matcher
    from server.structured.spec import parse_constraint

    schema = {"type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["title", "story", "tags"]}
    compiler = GrammarCompiler(engine.tokenizer.hf)
    spec = parse_constraint(None, {"json": schema, "close_within": 12})
    compiled = compiler.compile(spec)
    chat = engine.tokenizer.encode_chat([{"role": "user", "content": "Write a very long story about a dragon as JSON."}])
    params = SamplingParams(max_tokens=24, temperature=0.0)
    free, closing = (Request(list(chat), params, constraint=new_matcher(compiled, budget))
                     for budget in (0, spec.close_within))
    for r in (free, closing):
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    compiler.close()
    assert free.finish_reason == FinishReason.LENGTH and len(free.output_ids) == 24, engine.tokenizer.decode(free.output_ids)
    assert closing.finish_reason == FinishReason.STOP and len(closing.output_ids) <= 24, engine.tokenizer.decode(closing.output_ids)
    text = engine.tokenizer.decode(closing.output_ids)
    jsonschema.validate(json.loads(text), schema)
    assert closing.output_ids[:24 - 12] == free.output_ids[:24 - 12], "closing began before the budget"
    assert closing.output_ids != free.output_ids[:len(closing.output_ids)]
