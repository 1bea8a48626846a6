"""Engine outputs -> OpenAI response pieces: logprobs in the chat and completions shapes, SSE lines."""
from __future__ import annotations

import functools

from pydantic import BaseModel

from server.api.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.engine.request import TokenLogprob


class TokenText:
    """Token id -> its text (as the token renders alone), cached; the tokenizer is never mutated."""

    def __init__(self, hf_tokenizer) -> None:
        self._hf = hf_tokenizer

    @functools.lru_cache(maxsize=65536)
    def __call__(self, token_id: int) -> str:
        return self._hf.decode([token_id], skip_special_tokens=False)


def _top(text: TokenText, token_id: int, logprob: float) -> TopLogprob:
    s = text(token_id)
    return TopLogprob(token=s, logprob=logprob, bytes=list(s.encode("utf-8")))


def chat_logprobs(text: TokenText, lps: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        head = _top(text, lp.token_id, lp.logprob)
        content.append(ChatTokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes,
                                        top_logprobs=[_top(text, t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)


def completion_logprobs(text: TokenText, lps: list[TokenLogprob] | None, offset: int) -> CompletionLogprobs | None:
    """Legacy completions logprobs; `offset` is the text length before these tokens."""
    if lps is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        s = text(lp.token_id)
        tokens.append(s)
        values.append(lp.logprob)
        tops.append({text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON payload."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    import json
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
