"""server/api/render.py: logprobs in OpenAI's chat and completions shapes, SSE framing."""
import json
import math

import pytest

from server.api.protocol import PromptTokensDetails, Usage
from server.api.render import SSE_DONE, TokenText, chat_logprobs, completion_logprobs, sse
from server.engine.request import TokenLogprob
from server.model.default import ensure_default_model


@pytest.fixture(scope="module")
def text():
    from transformers import AutoTokenizer
    return TokenText(AutoTokenizer.from_pretrained(ensure_default_model()))


def _lps(hf, words: list[str]) -> list[TokenLogprob]:
    ids = [hf.encode(w, add_special_tokens=False)[0] for w in words]
    return [TokenLogprob(t, math.log(0.5), [(t, math.log(0.5)), (ids[0], math.log(0.25))]) for t in ids]


def test_completion_logprobs_offsets_follow_the_text(text):
    lps = _lps(text._hf, ["Hello", " world", "!"])
    out = completion_logprobs(text, lps, offset=7)
    assert out.tokens == ["Hello", " world", "!"]
    assert out.text_offset == [7, 12, 18]
    assert out.token_logprobs == [math.log(0.5)] * 3
    assert out.top_logprobs[1] == {" world": math.log(0.5), "Hello": math.log(0.25)}
    assert completion_logprobs(text, None, 0) is None


def test_chat_logprobs_shape(text):
    lps = _lps(text._hf, ["é", " ok"])
    out = chat_logprobs(text, lps)
    first = out.content[0]
    assert first.token == "é" and bytes(first.bytes).decode() == "é"
    assert [t.token for t in first.top_logprobs] == ["é", "é"]
    assert out.content[1].top_logprobs[1].logprob == math.log(0.25)
    assert chat_logprobs(text, None) is None


def test_sse_framing():
    line = sse(Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=1)))
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line[6:]) == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                                    "prompt_tokens_details": {"cached_tokens": 1}}
    assert sse({"error": {"message": "x"}}) == 'data: {"error": {"message": "x"}}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"
