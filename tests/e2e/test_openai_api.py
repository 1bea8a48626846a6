"""The OpenAI API of a live server, driven by the official `openai` client.

Greedy outputs and logprobs are compared with transformers (base) and PEFT (adapters) on
the same weights (the live server runs --quantization none).
"""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from tests.e2e.conftest import KEYS

PROMPT = "The three most useful things to pack for a long hike are"


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=KEYS["admin"], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(live_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(live_server.model_dir)
    model = AutoModelForCausalLM.from_pretrained(live_server.model_dir, dtype=torch.float32).eval()
    return tok, model


def _greedy_reference(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and each chosen token's logprob, one full forward per step."""
    ids = list(ids)
    out, lps = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].double()  # (V,)
            logp = torch.log_softmax(logits, -1)
            t = int(logits.argmax())
            out.append(t)
            lps.append(float(logp[t]))
            ids.append(t)
    return out, lps


def test_completion_matches_transformers_greedy_with_logprobs(client, hf, base_id):
    tok, model = hf
    ids = tok.encode(PROMPT)
    ref_ids, ref_lps = _greedy_reference(model, ids, 8)
    r = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    c = r.choices[0]
    assert c.text == tok.decode(ref_ids, skip_special_tokens=True)
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(ids) + 8
    assert c.logprobs.tokens == [tok.decode([t]) for t in ref_ids]
    assert c.logprobs.token_logprobs == pytest.approx(ref_lps, abs=2e-3)
    for lp, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-6)   # greedy = the best
    assert c.logprobs.text_offset[0] == 0
    assert "".join(c.logprobs.tokens) == c.text


def test_adapter_matches_peft_greedy(client, hf, live_server):
    from peft import PeftModel
    tok, model = hf
    ids = tok.encode(PROMPT)
    peft_model = PeftModel.from_pretrained(model, str(live_server.adapters_dir / "acme-support")).eval()
    try:
        ref_ids, _ = _greedy_reference(peft_model, ids, 8)
    finally:
        peft_model.unload()     # leaves the shared base model as it was
    base_ids, _ = _greedy_reference(model, ids, 8)
    assert ref_ids != base_ids, "the test adapter should change the greedy output"
    r = client.completions.create(model="acme-support", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.model == "acme-support"
    assert r.choices[0].text == tok.decode(ref_ids, skip_special_tokens=True)


def test_chat_usage_counts_the_chat_template(client, hf, base_id):
    tok, _ = hf
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=base_id, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.object == "chat.completion" and r.model == base_id
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.id.startswith("chatcmpl-")


@pytest.mark.parametrize("model", [None, "acme-support"])
def test_stream_text_equals_non_stream_text(client, base_id, model):
    model = model or base_id
    kw = dict(model=model, messages=[{"role": "user", "content": "Tell me a fact about owls."}],
              max_tokens=16, temperature=0.9, seed=1234)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    usage, want = chunks[-1].usage, full.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (want.prompt_tokens, want.completion_tokens, want.total_tokens)
    # the second request's prompt is served from the prefix cache; the text is the same
    assert usage.prompt_tokens_details.cached_tokens >= want.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_n_choices_with_seed(client, base_id):
    kw = dict(model=base_id, prompt="My favourite animal is", max_tokens=10, temperature=1.0, seed=7, n=2,
              extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]        # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text                           # seed + index: distinct
    assert a.usage.completion_tokens == 20
    prompt_len = client.completions.create(model=base_id, prompt="My favourite animal is", max_tokens=1,
                                           temperature=0).usage.prompt_tokens
    assert a.usage.prompt_tokens == prompt_len                             # the prompt counts once


def test_stop_string_cuts_the_output(client, base_id):
    full = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    cut = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_prompt_forms_of_completions(client, hf, base_id):
    tok, _ = hf
    ids = tok.encode(PROMPT)
    by_text = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = client.completions.create(model=base_id, prompt=ids, max_tokens=4, temperature=0)
    both = client.completions.create(model=base_id, prompt=[PROMPT, "Hello"], max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(tok.encode("Hello"))


def test_chat_logprobs(client, base_id):
    r = client.chat.completions.create(model=base_id, messages=[{"role": "user", "content": "Say hi."}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
        assert bytes(item.bytes).decode("utf-8", errors="replace") == item.token


def test_logit_bias_forces_and_bans_tokens(client, hf, base_id):
    tok, _ = hf
    banana = tok.encode(" banana", add_special_tokens=False)[0]
    prompt = "The capital of France is"
    forced = client.completions.create(model=base_id, prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={str(banana): 100})
    assert forced.choices[0].text == " banana" * 3
    free = client.completions.create(model=base_id, prompt=prompt, max_tokens=1, temperature=0, logprobs=0)
    first = free.choices[0].logprobs.tokens[0]
    first_id = tok.encode(first, add_special_tokens=False)[0]
    banned = client.chat.completions.create(
        model="acme-support", messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0,
        logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=base_id, prompt=prompt, max_tokens=1, logit_bias={"42": 101})
    assert e.value.body["param"] == "logit_bias"


def test_json_schema_through_an_adapter(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 8},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    r = client.chat.completions.create(
        model="shared-json", messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=40, temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_close_within_turns_a_cut_off_json_value_into_a_complete_one(client, base_id):
    """The same greedy request, cut at max_tokens when the client opts out of the closing
    budget (close_within 0), closed with the default budget and with one it names."""
    schema = {"type": "object", "required": ["title", "story", "tags"],
              "properties": {"title": {"type": "string"}, "story": {"type": "string"},
                             "tags": {"type": "array", "items": {"type": "string"}}}}
    rf = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}
    msg = [{"role": "user", "content": "Write a very long story about a dragon as JSON."}]
    cut = client.chat.completions.create(model=base_id, messages=msg, max_tokens=16, temperature=0,
                                         response_format=rf,
                                         extra_body={"structured_outputs": {"close_within": 0}})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 16
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)
    for extra in ({}, {"structured_outputs": {"close_within": 14}}):
        closed = client.chat.completions.create(model=base_id, messages=msg, max_tokens=16, temperature=0,
                                                response_format=rf, extra_body=extra)
        assert closed.choices[0].finish_reason == "stop" and closed.usage.completion_tokens <= 16, extra
        jsonschema.validate(json.loads(closed.choices[0].message.content), schema)


@pytest.mark.parametrize("max_tokens", [None, 200])
def test_a_looping_json_object_ends_parseable(client, base_id, max_tokens):
    """The prompt that loops (`"fur":"fur",...`) under json_object at temperature 0: with no
    max_tokens the request is capped and the loop detected, so it ends with an object that
    parses, far before the context limit; so does it within max_tokens 200."""
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    r = client.chat.completions.create(model=base_id, temperature=0, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Describe a cat as JSON."}], **extra)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.usage.completion_tokens <= (max_tokens or 1024)


def _ids(url: str, tenant: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[tenant], max_retries=0)
    return [m.id for m in c.models.list().data]


def test_models_per_tenant(live_server, base_id):
    assert _ids(live_server.url, "acme") == [base_id, "acme-support", "shared-json"]
    assert _ids(live_server.url, "beta") == [base_id, "beta-legal"]
    assert _ids(live_server.url, "admin") == [base_id, "acme-support", "beta-legal", "shared-json"]
    c = openai.OpenAI(base_url=live_server.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    cards = c.models.list().data
    assert cards[0].model_extra.get("parent") is None
    assert all(m.model_extra["parent"] == base_id for m in cards[1:])
    assert c.models.retrieve("acme-support").id == "acme-support"
    assert c.models.retrieve(base_id).id == base_id
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("beta-legal")
